/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * To a pod on another node: VXLAN in external (collect_md) mode, the VNI
 * carrying the source identity, or native routing straight to the uplink.
 */
#ifndef SINEW_ENCAP_H
#define SINEW_ENCAP_H

#include "common.h"
#include "events.h"

static __always_inline int encap_vxlan(struct __sk_buff *skb,
				       __u32 tunnel_endpoint, __u32 identity)
{
	struct bpf_tunnel_key key = {};
	int ret;

	if (!tunnel_endpoint)
		return -DROP_NO_TUNNEL_ENDPOINT;
	key.remote_ipv4 = bpf_ntohl(tunnel_endpoint);
	key.tunnel_id = identity;
	key.tunnel_ttl = 64;
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) <
	    0)
		return -DROP_TUNNEL_KEY;
	note_obs(TRACE_TO_TUNNEL);
	ret = bpf_redirect(CFG_VXLAN_IFINDEX, 0);
	if (ret != TC_ACT_REDIRECT)
		return -DROP_REDIRECT_FAILED;
	return ret;
}

/*
 * Native routing: hands the packet to the uplink with the other node as the
 * next hop, skipping the sender's host stack (the route the agent installs
 * for that node's pod CIDR says the same). Only valid from a TC hook; the
 * neighbour subsystem fills in the MAC addresses (and resolves them first
 * when it has to).
 */
static __always_inline int route_native(struct __sk_buff *skb, __u32 next_hop)
{
	struct bpf_redir_neigh nh = {};
	int ret;

	ret = ipv4_dec_ttl(skb);
	if (ret < 0)
		return ret;
	nh.nh_family = 2; /* AF_INET */
	nh.ipv4_nh = next_hop;
	note_obs(TRACE_TO_NETWORK);
	ret = bpf_redirect_neigh(CFG_UPLINK_IFINDEX, &nh, sizeof(nh), 0);
	if (ret != TC_ACT_REDIRECT)
		return -DROP_REDIRECT_FAILED;
	return ret;
}

#endif
