/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Delivery to a pod on this node, straight into its network namespace. */
#ifndef SINEW_LOCAL_H
#define SINEW_LOCAL_H

#include "maps.h"

/*
 * Rewrites the frame for the destination endpoint and hands it to the
 * pod-side veth with bpf_redirect_peer, skipping the host stack and the
 * host-side veth's backlog queue. Only valid from a TC ingress hook.
 */
static __always_inline int local_deliver(struct __sk_buff *skb, __u32 ifindex)
{
	struct endpoint_info *ep;
	int ret;

	ep = bpf_map_lookup_elem(&sinew_endpoints, &ifindex);
	if (!ep)
		return -DROP_UNKNOWN_ENDPOINT;
	ret = eth_rewrite(skb, ep->pod_mac, ep->host_mac);
	if (ret < 0)
		return ret;
	ret = ipv4_dec_ttl(skb);
	if (ret < 0)
		return ret;
	ret = bpf_redirect_peer(ifindex, 0);
	if (ret != TC_ACT_REDIRECT)
		return -DROP_REDIRECT_FAILED;
	return ret;
}

#endif
