// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Pod veth programs, attached to the host side of every pod's veth: one
 * loaded instance for all pods, per-pod facts from sinew_endpoints keyed by
 * the ifindex the packet is on.
 *
 * from_container: TC ingress of the host-side veth (packets the pod sends).
 * to_container:   TC egress of the host-side veth (packets the host stack
 *                 routes to the pod; direct deliveries bypass it).
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/metrics.h"
#include "lib/ipcache.h"
#include "lib/policy.h"
#include "lib/local.h"
#include "lib/encap.h"
#include "lib/arp.h"

static __always_inline int from_container_ipv4(struct __sk_buff *skb,
					       const struct endpoint_info *ep)
{
	struct iphdr *ip = PKT_PTR(skb, IP_OFF, struct iphdr);
	struct ipcache_value *dst;
	__u16 proxy_port;
	int ret;

	if (!ip || ip->version != 4 || ip->ihl < 5)
		return -DROP_INVALID_PACKET;
	if (ip->saddr != ep->ipv4)
		return -DROP_SPOOFED_SOURCE;

	dst = ipcache_lookup4(ip->daddr);
	ret = policy_enforce(skb, ep, POLICY_DIR_EGRESS,
			     dst ? dst->identity : SINEW_IDENTITY_WORLD,
			     &proxy_port);
	if (ret < 0)
		return ret;
	/* An egress L7 rule: this node's proxy takes it, wherever it goes. */
	if (proxy_port)
		return proxy_redirect(skb, proxy_port);
	/* Outside the cluster: the stack routes it, the uplink masquerades. */
	if (!dst)
		return TC_ACT_OK;
	if (dst->flags & IPCACHE_F_LOCAL_EP)
		return local_deliver(skb, dst->ifindex, ep->identity);
	if (CFG_ROUTING_MODE == ROUTING_VXLAN &&
	    (dst->flags & (IPCACHE_F_POD_CIDR | IPCACHE_F_REMOTE_EP)))
		return encap_vxlan(skb, dst->tunnel_endpoint, ep->identity,
				   dst->flags);
	if (CFG_ROUTING_MODE == ROUTING_NATIVE && CFG_UPLINK_IFINDEX &&
	    dst->tunnel_endpoint &&
	    (dst->flags & (IPCACHE_F_POD_CIDR | IPCACHE_F_REMOTE_EP)))
		return route_native(skb, dst->tunnel_endpoint, dst->flags);
	/* IPsec: another node's address in VXLAN too, since the XFRM
	 * policies cover the node pair's VXLAN, not pod addresses. */
	if (CFG_ENCRYPT_IPSEC && CFG_ROUTING_MODE == ROUTING_VXLAN &&
	    dst->tunnel_endpoint && (dst->flags & IPCACHE_F_NODE))
		return encap_vxlan(skb, dst->tunnel_endpoint, ep->identity,
				   dst->flags);
	/* Node addresses: routed by the node. */
	return TC_ACT_OK;
}

SEC("classifier")
int from_container(struct __sk_buff *skb)
{
	events_begin(HOOK_FROM_CONTAINER);
	__u32 ifindex = skb->ifindex;
	struct endpoint_info *ep;
	int ret;

	ep = bpf_map_lookup_elem(&sinew_endpoints, &ifindex);
	if (!ep) {
		ret = -DROP_UNKNOWN_ENDPOINT;
		goto out;
	}
	switch (bpf_ntohs(skb->protocol)) {
	case ETH_P_IP:
		ret = from_container_ipv4(skb, ep);
		break;
	case ETH_P_ARP:
		ret = arp_respond(skb, ep);
		break;
	default:
		ret = -DROP_UNSUPPORTED_L3;
	}
out:
	return finish(skb, ret, METRIC_DIR_EGRESS, HOOK_FROM_CONTAINER);
}

SEC("classifier")
int to_container(struct __sk_buff *skb)
{
	events_begin(HOOK_TO_CONTAINER);
	__u32 ifindex = skb->ifindex;
	struct ipcache_value *src;
	struct endpoint_info *ep;
	struct iphdr *ip;
	__u16 proxy_port;
	__u32 peer;
	int ret = TC_ACT_OK;

	ep = bpf_map_lookup_elem(&sinew_endpoints, &ifindex);
	if (!ep) {
		ret = -DROP_UNKNOWN_ENDPOINT;
		goto out;
	}
	if (skb->protocol != bpf_htons(ETH_P_IP))
		goto out;
	ip = PKT_PTR(skb, IP_OFF, struct iphdr);
	if (!ip) {
		ret = -DROP_INVALID_PACKET;
		goto out;
	}
	/* The proxy's upstream connection for a client: judged as that
	 * client, never redirected again. */
	if (proxy_mark_identity(skb->mark, &peer)) {
		ret = policy_enforce(skb, ep, POLICY_DIR_INGRESS, peer, 0);
		if (ret == 0)
			ret = TC_ACT_OK;
		goto out;
	}
	/* What the stack routes here: the node itself, or native-routed
	 * traffic that was not delivered directly. */
	src = ipcache_lookup4(ip->saddr);
	ret = policy_enforce(skb, ep, POLICY_DIR_INGRESS,
			     src ? src->identity : SINEW_IDENTITY_WORLD,
			     &proxy_port);
	/* An L7 rule covers it, but a packet on its way out of the host
	 * cannot be assigned to the proxy: fail closed. */
	if (ret == 0 && proxy_port)
		ret = -DROP_PROXY_UNAVAILABLE;
	if (ret == 0)
		ret = TC_ACT_OK;
out:
	return finish(skb, ret, METRIC_DIR_INGRESS, HOOK_TO_CONTAINER);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
