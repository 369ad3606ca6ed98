// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Uplink device programs (the node's interface to the underlay).
 *
 * from_netdev: TC ingress. With encryption on, VXLAN, another node's
 *              traffic for a local pod and another node's pods' traffic
 *              for this node that arrive in clear are dropped (only
 *              decrypted traffic may carry another node's pods), and with
 *              --encrypt-node so is another node's traffic for this node
 *              but WireGuard's own, or ESP and what Sinew's IPsec
 *              decrypted.
 *              Replies to masqueraded flows are translated back;
 *              node ports go to a backend (on this node with the
 *              client's address kept, or on another node from this node's
 *              address); packets for a local pod (native routing) are
 *              delivered into it directly, and a connection opened from
 *              outside the cluster is remembered so its replies are not
 *              masqueraded; everything else goes up the stack.
 * to_netdev:   TC egress. Pod traffic to addresses outside the cluster is
 *              masqueraded to the node address.
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/metrics.h"
#include "lib/ipcache.h"
#include "lib/policy.h"
#include "lib/local.h"
#include "lib/nat.h"
#include "lib/nodeport.h"
#include "lib/encap.h"

SEC("classifier")
int from_netdev(struct __sk_buff *skb)
{
	events_begin(HOOK_FROM_NETDEV);
	struct ipcache_value *dst, *src;
	struct nat_key key = {};
	struct iphdr *ip;
	__u32 daddr, saddr;
	int ret = TC_ACT_OK;
	int translated = 0;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		goto out;
	ip = PKT_PTR(skb, IP_OFF, struct iphdr);
	if (!ip) {
		ret = -DROP_INVALID_PACKET;
		goto out;
	}
	daddr = ip->daddr;
	saddr = ip->saddr;
	dst = 0;
	if (daddr != CFG_NODE_IP) {
		dst = ipcache_lookup4(daddr);
		/* A pod here (native routing) or something else in the
		 * cluster: no service address. */
		if (dst && (dst->flags & IPCACHE_F_IN_CLUSTER))
			goto deliver;
	}
	{
		/* To the node, or to an address outside the cluster that the
		 * network routes here: a service's ExternalIP or LoadBalancer
		 * IP. Not every such packet is NATed: errors mean "not
		 * ours". */
		/* With encryption on, VXLAN comes only through decryption:
		 * in clear, fragmented or not, it goes no further (not even
		 * to the kernel's VXLAN socket). */
		if (CFG_ROUTING_MODE == ROUTING_VXLAN &&
		    vxlan_in_clear(skb, ip)) {
			ret = -DROP_UNENCRYPTED_FROM_PEER;
			goto out;
		}
		/* Nor do other nodes' pods (and, with --encrypt-node, the
		 * nodes) send to this node's address in clear. */
		if (daddr == CFG_NODE_IP && to_node_in_clear(skb, ip)) {
			ret = -DROP_UNENCRYPTED_FROM_PEER;
			goto out;
		}
		if (nat_key_from_packet(skb, ip, &key) < 0)
			goto out;
		/* Tunnel packets: for a pod here, unwrapped and delivered;
		 * else the overlay device's. No NAT or service lookups. */
		if (CFG_ROUTING_MODE == ROUTING_VXLAN &&
		    key.proto == IPPROTO_UDP &&
		    key.dport == bpf_htons(SINEW_VXLAN_PORT)) {
			ret = decap_vxlan_deliver(skb);
			if (ret == 0)
				ret = TC_ACT_OK;
			goto out;
		}
		/* A masqueraded flow's reply, or a node port flow's next
		 * packet; else maybe a node port flow's first one. */
		ret = nat_rev_dnat(skb, &key, &daddr);
		if (ret == 0)
			ret = lb_nat_known(skb, &key);
		if (ret == 0)
			ret = nodeport_dnat(skb, &key, &daddr);
		if (ret == NODEPORT_REFUSE) {
			/* The stack answers; seen and counted as the drop
			 * of a service without backends. */
			event_verdict(skb, -DROP_NO_SERVICE_BACKEND,
				      METRIC_DIR_INGRESS, HOOK_FROM_NETDEV, 0);
			metrics_count(skb, DROP_NO_SERVICE_BACKEND,
				      METRIC_DIR_INGRESS);
			return TC_ACT_OK;
		}
		if (ret <= 0 || ret == TC_ACT_REDIRECT ||
		    ret == RET_ENCAPSULATED)
			goto out;
		translated = 1;
		ret = TC_ACT_OK;
		dst = ipcache_lookup4(daddr);
	}
deliver:
	if (dst && (dst->flags & IPCACHE_F_LOCAL_EP)) {
		/* Native routing: the sender is known by its address. */
		src = ipcache_lookup4(saddr);
		/* Another node's pods and the node itself send to pods here
		 * only through encryption when it is on. */
		if (!translated && from_peer_in_clear(skb, src)) {
			ret = -DROP_UNENCRYPTED_FROM_PEER;
			goto out;
		}
		ret = local_deliver(skb, dst->ifindex,
				    src ? src->identity : SINEW_IDENTITY_WORLD);
		if (CFG_ENABLE_MASQ && ret >= 0 && !translated &&
		    !(src && (src->flags & IPCACHE_F_IN_CLUSTER)))
			nat_note_inbound(skb);
	}
out:
	return finish(skb, ret, METRIC_DIR_INGRESS, HOOK_FROM_NETDEV);
}

SEC("classifier")
int to_netdev(struct __sk_buff *skb)
{
	events_begin(HOOK_TO_NETDEV);
	struct ipcache_value *src, *dst;
	struct nat_key key = {};
	struct iphdr *ip;
	int ret = TC_ACT_OK;

	/* A pod's packet that from_container routed to another node. */
	if (skb->mark == SINEW_MARK_ROUTED) {
		skb->mark = 0;
		goto out;
	}
	if (skb->protocol != bpf_htons(ETH_P_IP))
		goto out;
	ip = PKT_PTR(skb, IP_OFF, struct iphdr);
	if (!ip) {
		ret = -DROP_INVALID_PACKET;
		goto out;
	}
	/* The node's own packets (tunnel packets too) are never translated;
	 * with encryption on, those for another node go into WireGuard. */
	if (ip->saddr == CFG_NODE_IP) {
		ret = encrypt_to_node(skb, ip, 0);
		if (ret == 0)
			ret = TC_ACT_OK;
		goto out;
	}
	src = ipcache_lookup4(ip->saddr);
	if (!src || !(src->flags & IPCACHE_F_LOCAL_EP))
		goto out;
	/* A pod's packet the stack routes to another node. */
	ret = encrypt_to_node(skb, ip, 1);
	if (ret != 0)
		goto out;
	ret = TC_ACT_OK;
	/* Inside the cluster: keep the pod address. */
	dst = ipcache_lookup4(ip->daddr);
	if (dst && (dst->flags & IPCACHE_F_IN_CLUSTER))
		goto out;
	ret = nat_key_from_packet(skb, ip, &key);
	if (ret < 0) {
		/* Without masquerade nothing here needs translating. */
		if (!CFG_ENABLE_MASQ)
			ret = TC_ACT_OK;
		goto out;
	}
	/* Without masquerade only node port replies are translated. */
	if (!CFG_ENABLE_MASQ && !bpf_map_lookup_elem(&sinew_nat, &key)) {
		ret = TC_ACT_OK;
		goto out;
	}
	ret = nat_snat(skb, &key);
	if (ret == 0)
		ret = TC_ACT_OK;
out:
	return finish(skb, ret, METRIC_DIR_EGRESS, HOOK_TO_NETDEV);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
