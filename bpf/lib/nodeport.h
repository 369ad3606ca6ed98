/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * NodePort at the uplink, per packet, for services with
 * externalTrafficPolicy Local: the first packet of a flow to the node's
 * address and a node port picks a backend on this node and is sent to it
 * with the client's address kept; both directions of the translation go
 * into sinew_nat, so later packets are translated by nat_rev_dnat (in
 * from_netdev) and replies by nat_snat's existing-flow path (in to_netdev),
 * as masqueraded flows are. Node ports (30000-32767) and masquerade ports
 * never overlap, so the two share the table.
 */
#ifndef SINEW_NODEPORT_H
#define SINEW_NODEPORT_H

#include "lb.h"
#include "nat.h"

/* Returns 1 when the packet was sent to a backend (*daddr is its address),
 * 0 when it is not for a node port, or a negative drop reason. */
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
	if (!be)
		return -DROP_NO_SERVICE_BACKEND;
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
