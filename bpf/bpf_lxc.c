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
#include "lib/local.h"
#include "lib/encap.h"
#include "lib/arp.h"

static __always_inline int from_container_ipv4(struct __sk_buff *skb,
					       const struct endpoint_info *ep)
{
	struct iphdr *ip = PKT_PTR(skb, IP_OFF, struct iphdr);
	struct ipcache_value *dst;

	if (!ip || ip->version != 4 || ip->ihl < 5)
		return -DROP_INVALID_PACKET;
	if (ip->saddr != ep->ipv4)
		return -DROP_SPOOFED_SOURCE;

	dst = ipcache_lookup4(ip->daddr);
	if (!dst)
		return TC_ACT_OK; /* outside the cluster: the stack (and masq)
				   */
	if (dst->flags & IPCACHE_F_LOCAL_EP)
		return local_deliver(skb, dst->ifindex);
	if (CFG_ROUTING_MODE == ROUTING_VXLAN &&
	    (dst->flags & IPCACHE_F_POD_CIDR))
		return encap_vxlan(skb, dst->tunnel_endpoint, ep->identity);
	/* Native routing, node addresses: routed by the node. */
	return TC_ACT_OK;
}

SEC("classifier")
int from_container(struct __sk_buff *skb)
{
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
	return finish(skb, ret, METRIC_DIR_EGRESS);
}

SEC("classifier")
int to_container(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	int ret = TC_ACT_OK;

	if (!bpf_map_lookup_elem(&sinew_endpoints, &ifindex))
		ret = -DROP_UNKNOWN_ENDPOINT;
	return finish(skb, ret, METRIC_DIR_INGRESS);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
