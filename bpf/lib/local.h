/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Delivery to a pod on this node, straight into its network namespace. */
#ifndef SINEW_LOCAL_H
#define SINEW_LOCAL_H

#include "maps.h"
#include "policy.h"
#include "proxy.h"

/*
 * Rewrites the frame for the destination endpoint and hands it to the
 * pod-side veth with bpf_redirect_peer, skipping the host stack and the
 * host-side veth's backlog queue, after the destination's ingress policy
 * (or hands it to the proxy when an ingress L7 rule covers it). Only valid
 * from a TC ingress hook.
 */
static __always_inline int local_deliver(struct __sk_buff *skb, __u32 ifindex,
					 __u32 src_identity)
{
	struct endpoint_info *ep;
	__u16 proxy_port;
	int ret;

	ep = bpf_map_lookup_elem(&sinew_endpoints, &ifindex);
	if (!ep)
		return -DROP_UNKNOWN_ENDPOINT;
	/* Ingress policy here: bpf_redirect_peer skips to_container. */
	ret = policy_enforce(skb, ep, POLICY_DIR_INGRESS, src_identity,
			     &proxy_port);
	if (ret < 0)
		return ret;
	/* An ingress L7 rule: this node's proxy, not the pod, takes it. */
	if (proxy_port) {
		proxy_note_source(skb, src_identity);
		return proxy_redirect(skb, proxy_port);
	}
	ret = eth_rewrite(skb, ep->pod_mac, ep->host_mac);
	if (ret < 0)
		return ret;
	ret = ipv4_dec_ttl(skb);
	if (ret < 0)
		return ret;
	note_obs(TRACE_TO_ENDPOINT);
	ret = bpf_redirect_peer(ifindex, 0);
	if (ret != TC_ACT_REDIRECT)
		return -DROP_REDIRECT_FAILED;
	return ret;
}

#endif
