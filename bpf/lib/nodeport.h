/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * NodePort, ExternalIPs and LoadBalancer IPs at the uplink, per packet.
 * The first packet of a flow to the node's address and a node port, or to
 * an external service address and port that the network routes to this
 * node, picks a backend.
 *
 * A backend on this node (always the case for externalTrafficPolicy
 * Local) gets the packet with the client's address kept; both directions
 * of the translation go into sinew_nat, so later packets are translated by
 * nat_rev_dnat (in from_netdev) and replies by nat_snat's existing-flow
 * path (in to_netdev), as masqueraded flows are. Node ports (30000-32767)
 * and masquerade ports never overlap, so the two share the table.
 *
 * A backend on another node (Cluster) gets it from the node's address and
 * a port of the masquerade range, so that its reply comes back here: both
 * directions go into sinew_lb_nat, and each packet is sent on at once (to
 * the backend through the tunnel or the underlay, the reply back out of
 * the uplink): the stack would drop a packet whose source is its own.
 */
#ifndef SINEW_NODEPORT_H
#define SINEW_NODEPORT_H

#include "lb.h"
#include "nat.h"
#include "ipcache.h"
#include "encap.h"

#define LB_NAT_MAX_ENTRIES 65536

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct nat_key);
	__type(value, struct lb_nat_entry);
	__uint(max_entries, LB_NAT_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sinew_lb_nat SEC(".maps");

/* Rewrites destination and source as the entry says and sends the packet
 * on. */
static __always_inline int lb_nat_forward(struct __sk_buff *skb,
					  const struct nat_key *key,
					  const struct lb_nat_entry *e)
{
	struct ipcache_value *dst;
	int ret;

	ret = nat_rewrite(skb, key->proto, 0, key->daddr, e->daddr, key->dport,
			  e->dport);
	if (ret < 0)
		return ret;
	ret = nat_rewrite(skb, key->proto, 1, key->saddr, e->saddr, key->sport,
			  e->sport);
	if (ret < 0)
		return ret;
	if (e->dir == LB_NAT_TO_BACKEND && CFG_ROUTING_MODE == ROUTING_VXLAN) {
		dst = ipcache_lookup4(e->daddr);
		return encap_vxlan(skb, dst ? dst->tunnel_endpoint : 0,
				   SINEW_IDENTITY_HOST, dst ? dst->flags : 0);
	}
	/* The underlay: the backend's node, or the client. */
	ret = bpf_redirect_neigh(skb->ifindex, 0, 0, 0);
	if (ret != TC_ACT_REDIRECT)
		return -DROP_REDIRECT_FAILED;
	return ret;
}

/* A packet of a node port flow with a remote backend, either direction:
 * the verdict, or 0 when it is not one. */
static __always_inline int lb_nat_known(struct __sk_buff *skb,
					const struct nat_key *key)
{
	struct lb_nat_entry *e = bpf_map_lookup_elem(&sinew_lb_nat, key);
	struct lb_nat_entry copy;

	if (!e)
		return 0;
	copy = *e;
	return lb_nat_forward(skb, key, &copy);
}

/* Sets up a node port flow to a backend on another node. */
static __always_inline int nodeport_snat(struct __sk_buff *skb,
					 const struct nat_key *key,
					 const struct lb_backend *be)
{
	struct lb_nat_entry fwd = {}, rev = {};
	struct nat_key rk = {};
	__u32 range = CFG_NAT_PORT_MAX - CFG_NAT_PORT_MIN + 1;
	__u32 start = bpf_get_prandom_u32();
	__u64 now = bpf_ktime_get_ns();
	int i;

	rev.daddr = key->saddr;
	rev.dport = key->sport;
	rev.saddr = key->daddr;
	rev.sport = key->dport;
	rev.dir = LB_NAT_TO_CLIENT;
	rev.created_ns = now;
	/* The backend answers the node (the frontend may be an ExternalIP
	 * that its node does not own). */
	rk.saddr = be->addr;
	rk.daddr = CFG_NODE_IP;
	rk.sport = be->port;
	rk.proto = key->proto;
	for (i = 0; i < NAT_PORT_TRIES; i++) {
		rk.dport = bpf_htons(CFG_NAT_PORT_MIN + (start + i) % range);
		if (bpf_map_update_elem(&sinew_lb_nat, &rk, &rev,
					BPF_NOEXIST) == 0)
			break;
	}
	if (i == NAT_PORT_TRIES)
		return -DROP_NAT_NO_PORT;
	fwd.daddr = be->addr;
	fwd.dport = be->port;
	fwd.saddr = CFG_NODE_IP;
	fwd.sport = rk.dport;
	fwd.dir = LB_NAT_TO_BACKEND;
	fwd.created_ns = now;
	if (bpf_map_update_elem(&sinew_lb_nat, key, &fwd, BPF_ANY) < 0) {
		bpf_map_delete_elem(&sinew_lb_nat, &rk);
		return -DROP_NAT_NO_PORT;
	}
	return lb_nat_forward(skb, key, &fwd);
}

/* nodeport_dnat: a node port whose service has no backend anywhere. */
#define NODEPORT_REFUSE 100

/* Returns 1 when the packet was translated for a local backend (*daddr is
 * its address), TC_ACT_REDIRECT or RET_ENCAPSULATED when it was sent to a
 * remote one, 0 when it is not for a node port, NODEPORT_REFUSE, or a
 * negative drop reason. */
static __always_inline int
nodeport_dnat(struct __sk_buff *skb, const struct nat_key *key, __u32 *daddr)
{
	struct lb_svc_key sk = {};
	struct nat_key reply = {};
	struct nat_value out = {}, in = {};
	struct lb_svc_value *svc;
	struct lb_backend *be = 0;
	__u32 id;
	int ret;

	if (key->proto != IPPROTO_TCP && key->proto != IPPROTO_UDP)
		return 0;
	sk.vip = key->daddr;
	sk.port = key->dport;
	sk.proto = key->proto;
	sk.scope = LB_SCOPE_EXTERNAL;
	svc = bpf_map_lookup_elem(&sinew_lb_services, &sk);
	if (!svc)
		return 0;
	if (svc->count) {
		id = lb_select(svc, lb_hash(key->saddr, key->sport, key->daddr,
					    key->dport | (key->proto << 16)));
		if (id)
			be = lb_backend_usable(id, svc->svc_id);
	}
	if (!be) {
		/*
		 * No backend anywhere: the node refuses, as kube-proxy's REJECT
		 * does (its stack answers a SYN with a reset and a datagram
		 * with ICMP port unreachable, nothing being bound to a node
		 * port), so the client fails at once. externalTrafficPolicy
		 * Local without a local backend drops instead, as kube-proxy
		 * does, so that a load balancer's health check moves away.
		 */
		if (svc->flags & LB_F_LOCAL_ONLY)
			return -DROP_NO_LOCAL_BACKEND;
		if (!svc->count)
			return NODEPORT_REFUSE;
		return -DROP_NO_SERVICE_BACKEND;
	}
	if (!(svc->flags & LB_F_LOCAL_ONLY)) {
		struct ipcache_value *where = ipcache_lookup4(be->addr);

		if (!where || !(where->flags & IPCACHE_F_LOCAL_EP))
			return nodeport_snat(skb, key, be);
	}
	in.addr = be->addr;
	in.port = be->port;
	in.created_ns = bpf_ktime_get_ns();
	out.addr = key->daddr;
	out.port = key->dport;
	out.created_ns = in.created_ns;
	reply.saddr = be->addr;
	reply.daddr = key->saddr;
	reply.sport = be->port;
	reply.dport = key->sport;
	reply.proto = key->proto;
	if (bpf_map_update_elem(&sinew_nat, &reply, &out, BPF_ANY) < 0 ||
	    bpf_map_update_elem(&sinew_nat, key, &in, BPF_ANY) < 0)
		return -DROP_NAT_NO_PORT;
	*daddr = be->addr;
	ret = nat_rewrite(skb, key->proto, 0, key->daddr, be->addr, key->dport,
			  be->port);
	return ret < 0 ? ret : 1;
}

#endif
