// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * VXLAN device programs (external mode, one device per node).
 *
 * from_overlay: TC ingress, decapsulated packets from other nodes: delivered
 *               straight into the destination pod.
 * to_overlay:   TC egress, packets the host stack routes into the tunnel
 *               (node to remote pod): the tunnel endpoint comes from the
 *               ipcache, the VNI says "host".
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/metrics.h"
#include "lib/ipcache.h"
#include "lib/policy.h"
#include "lib/local.h"

SEC("classifier")
int from_overlay(struct __sk_buff *skb)
{
	events_begin(HOOK_FROM_OVERLAY);
	struct bpf_tunnel_key key = {};
	struct ipcache_value *dst;
	struct iphdr *ip;
	int ret = TC_ACT_OK;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		goto out;
	ip = PKT_PTR(skb, IP_OFF, struct iphdr);
	if (!ip) {
		ret = -DROP_INVALID_PACKET;
		goto out;
	}
	dst = ipcache_lookup4(ip->daddr);
	if (dst && (dst->flags & IPCACHE_F_LOCAL_EP)) {
		/* The sender's identity travels in the VNI. */
		if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0) {
			ret = -DROP_TUNNEL_KEY;
			goto out;
		}
		ret = local_deliver(skb, dst->ifindex, key.tunnel_id);
	} else if (ip->daddr == CFG_NODE_IP && skb->pkt_type != PACKET_HOST) {
		/* A remote pod's packet for this node (IPsec sends those in
		 * VXLAN): the inner frame carries the sender's MACs, which the
		 * stack would drop as meant for another host. */
		if (bpf_skb_change_type(skb, PACKET_HOST) < 0)
			ret = -DROP_INVALID_PACKET;
	}
out:
	return finish(skb, ret, METRIC_DIR_INGRESS, HOOK_FROM_OVERLAY);
}

SEC("classifier")
int to_overlay(struct __sk_buff *skb)
{
	events_begin(HOOK_TO_OVERLAY);
	struct bpf_tunnel_key key = {};
	struct ipcache_value *dst;
	struct iphdr *ip;
	__u32 client;
	int ret = TC_ACT_OK;

	if (skb->protocol != bpf_htons(ETH_P_IP)) {
		ret = -DROP_UNSUPPORTED_L3;
		goto out;
	}
	ip = PKT_PTR(skb, IP_OFF, struct iphdr);
	if (!ip) {
		ret = -DROP_INVALID_PACKET;
		goto out;
	}
	/*
	 * Already given a key by from_container: leave it alone. (On transmit
	 * metadata the helper reports the remote as local_ipv4, so "any key at
	 * all" is the test, not remote_ipv4.)
	 */
	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) == 0)
		goto out;
	__builtin_memset(&key, 0, sizeof(key));
	dst = ipcache_lookup4(ip->daddr);
	if (!dst || !dst->tunnel_endpoint) {
		ret = -DROP_NO_TUNNEL_ENDPOINT;
		goto out;
	}
	key.remote_ipv4 = bpf_ntohl(dst->tunnel_endpoint);
	/* The receiving node sees this node as a remote node, never as
	 * itself (host is always let in). */
	key.tunnel_id = SINEW_IDENTITY_REMOTE_NODE;
	/* The proxy's upstream connection: the receiving node judges it as
	 * the proxy's client (a pod: egress proxies serve local pods, whose
	 * identities fit the 24-bit VNI). */
	if (proxy_mark_identity(skb->mark, &client))
		key.tunnel_id =
		    client <= 0xffffff ? client : SINEW_IDENTITY_WORLD;
	key.tunnel_ttl = 64;
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) <
	    0)
		ret = -DROP_TUNNEL_KEY;
out:
	return finish(skb, ret, METRIC_DIR_EGRESS, HOOK_TO_OVERLAY);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
