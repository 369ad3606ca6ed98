/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* VXLAN in external (collect_md) mode: the VNI carries the source identity. */
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

#endif
