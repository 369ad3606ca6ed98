/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * To a pod on another node: VXLAN in external (collect_md) mode, the VNI
 * carrying the source identity, or native routing straight to the uplink.
 */
#ifndef SINEW_ENCAP_H
#define SINEW_ENCAP_H

#include "common.h"
#include "events.h"
#include "ipcache.h"
#include "local.h"
#include "encrypt.h"

/* The kernel's VXLAN device adds the headers: the tunnel key is metadata. */
static __always_inline int
encap_vxlan_dev(struct __sk_buff *skb, __u32 tunnel_endpoint, __u32 identity)
{
	struct bpf_tunnel_key key = {};
	int ret;

	key.remote_ipv4 = bpf_ntohl(tunnel_endpoint);
	key.tunnel_id = identity;
	key.tunnel_ttl = 64;
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) <
	    0)
		return -DROP_TUNNEL_KEY;
	ret = bpf_redirect(CFG_VXLAN_IFINDEX, 0);
	if (ret != TC_ACT_REDIRECT)
		return -DROP_REDIRECT_FAILED;
	return ret;
}

struct vxlan_hdr {
	__be32 flags;
	__be32 vni; /* VNI << 8 */
};

/* What goes between the outer and the inner Ethernet header, and the inner
 * one: the first VXLAN_ENCAP_LEN bytes (the rest is the struct's tail
 * padding). */
struct vxlan_encap {
	struct iphdr ip;
	struct udphdr udp;
	struct vxlan_hdr vx;
	struct ethhdr inner;
};

_Static_assert(__builtin_offsetof(struct vxlan_encap, inner) +
		       sizeof(struct ethhdr) ==
		   VXLAN_ENCAP_LEN,
	       "VXLAN headers are 50 bytes");
#define VXLAN_FLAG_VNI	  0x08000000 /* "I": the VNI is valid */
#define VXLAN_SPORT_MIN	  32768	     /* the kernel's default ephemeral */
#define VXLAN_SPORT_RANGE 28232	     /* ports, like its VXLAN devices */
#define IP_DF		  0x4000
#define ADJ_ROOM_VXLAN_ENCAP                                                   \
	(BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP |          \
	 BPF_F_ADJ_ROOM_ENCAP_L2_ETH | BPF_F_ADJ_ROOM_ENCAP_L2(ETH_HLEN))

static __always_inline __u16 ipv4_header_csum(const struct iphdr *ip)
{
	const __u16 *w = (const __u16 *)ip;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < (int)sizeof(*ip) / 2; i++)
		sum += w[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

/*
 * VXLAN to another node, the VNI carrying the source identity. The headers
 * are written here and the packet goes straight to the uplink, routed to
 * the tunnel endpoint by the kernel's FIB and neighbour tables: no pass
 * through the VXLAN device, its route lookup and the node's output path.
 * The frame is what the VXLAN device would have sent (outer UDP checksum
 * 0, DF, source port from the inner flow's hash, marked as a UDP tunnel so
 * GSO segments it). The device stays for receiving and for the node's own
 * packets; without an uplink, or for a frame too big to describe in one
 * outer header, it sends this one too. Returns RET_ENCAPSULATED,
 * TC_ACT_REDIRECT (the device) or a negative drop reason.
 */
static __always_inline int encap_vxlan(struct __sk_buff *skb,
				       __u32 tunnel_endpoint, __u32 identity,
				       __u32 dst_flags)
{
	struct vxlan_encap h = {};
	struct ethhdr *eth;
	__u32 inner_len = skb->len - ETH_HLEN + VXLAN_ENCAP_LEN;
	__u32 hash;
	int ret;

	if (!tunnel_endpoint)
		return -DROP_NO_TUNNEL_ENDPOINT;
	/* Fail closed before any work: no key, never in clear. */
	if ((CFG_ENCRYPT_IFINDEX || CFG_ENCRYPT_IPSEC) &&
	    !(dst_flags & IPCACHE_F_ENCRYPT))
		return -DROP_NO_ENCRYPTION_KEY;
	note_obs(TRACE_TO_TUNNEL);
	/* IPsec: the VXLAN device's packets pass the stack's XFRM policy for
	 * the node pair, which makes them ESP; a packet built here would skip
	 * it. */
	if (!CFG_UPLINK_IFINDEX || inner_len > 0xffff || CFG_ENCRYPT_IPSEC)
		return encap_vxlan_dev(skb, tunnel_endpoint, identity);
	eth = PKT_PTR(skb, ETH_OFF, struct ethhdr);
	if (!eth)
		return -DROP_INVALID_PACKET;
	__builtin_memcpy(&h.inner, eth, sizeof(h.inner));
	hash = bpf_get_hash_recalc(skb);

	h.ip.version = 4;
	h.ip.ihl = 5;
	h.ip.tot_len = bpf_htons(inner_len);
	h.ip.frag_off = bpf_htons(IP_DF);
	h.ip.ttl = 64;
	h.ip.protocol = IPPROTO_UDP;
	h.ip.saddr = CFG_NODE_IP;
	h.ip.daddr = tunnel_endpoint;
	h.ip.check = ipv4_header_csum(&h.ip);
	h.udp.source = bpf_htons(
	    VXLAN_SPORT_MIN + (__u16)(((__u64)hash * VXLAN_SPORT_RANGE) >> 32));
	h.udp.dest = bpf_htons(SINEW_VXLAN_PORT);
	h.udp.len = bpf_htons(inner_len - sizeof(struct iphdr));
	h.vx.flags = bpf_htonl(VXLAN_FLAG_VNI);
	h.vx.vni = bpf_htonl(identity << 8);

	if (bpf_skb_adjust_room(skb, VXLAN_ENCAP_LEN, BPF_ADJ_ROOM_MAC,
				ADJ_ROOM_VXLAN_ENCAP) < 0)
		return -DROP_ENCAP_FAILED;
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &h, VXLAN_ENCAP_LEN, 0) < 0)
		return -DROP_ENCAP_FAILED;
	/* VXLAN inside WireGuard: the VNI keeps the source identity. */
	if (CFG_ENCRYPT_IFINDEX)
		ret = encrypt_redirect(dst_flags);
	else
		ret = bpf_redirect_neigh(CFG_UPLINK_IFINDEX, 0, 0, 0);
	if (ret < 0)
		return ret;
	if (ret != TC_ACT_REDIRECT)
		return -DROP_REDIRECT_FAILED;
	return RET_ENCAPSULATED;
}

/*
 * A VXLAN packet from another node for a pod here: the tunnel headers are
 * removed here and the packet is delivered into the pod at once, instead of
 * the UDP socket, the VXLAN device and a second pass through the receive
 * path. The VNI is the sender's identity. GSO packets keep their segment
 * size (the inner one). Returns 0 when the VXLAN device should have the
 * packet (not for a local pod, headers not in the linear data, IP options
 * on the outer header), else the verdict of the delivery.
 */
static __always_inline int decap_vxlan_deliver(struct __sk_buff *skb)
{
	struct vxlan_encap *h = PKT_PTR(skb, IP_OFF, struct vxlan_encap);
	struct iphdr *inner =
	    PKT_PTR(skb, IP_OFF + VXLAN_ENCAP_LEN, struct iphdr);
	struct ipcache_value *dst;
	__u32 identity, ifindex;

	if (!h || !inner)
		return 0;
	if (h->ip.ihl != 5 || ipv4_is_fragment(&h->ip) ||
	    !(h->vx.flags & bpf_htonl(VXLAN_FLAG_VNI)) ||
	    h->inner.h_proto != bpf_htons(ETH_P_IP) || inner->version != 4)
		return 0;
	identity = bpf_ntohl(h->vx.vni) >> 8;
	dst = ipcache_lookup4(inner->daddr);
	if (!dst || !(dst->flags & IPCACHE_F_LOCAL_EP))
		return 0;
	ifindex = dst->ifindex;
	if (bpf_skb_adjust_room(skb, -VXLAN_ENCAP_LEN, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO) < 0)
		return -DROP_ENCAP_FAILED;
	return local_deliver(skb, ifindex, identity);
}

/*
 * Native routing: hands the packet to the uplink with the other node as the
 * next hop, skipping the sender's host stack (the route the agent installs
 * for that node's pod CIDR says the same). Only valid from a TC hook; the
 * neighbour subsystem fills in the MAC addresses (and resolves them first
 * when it has to).
 */
static __always_inline int route_native(struct __sk_buff *skb, __u32 next_hop,
					__u32 dst_flags)
{
	struct bpf_redir_neigh nh = {};
	int ret;

	if ((CFG_ENCRYPT_IFINDEX || CFG_ENCRYPT_IPSEC) &&
	    !(dst_flags & IPCACHE_F_ENCRYPT))
		return -DROP_NO_ENCRYPTION_KEY;
	ret = ipv4_dec_ttl(skb);
	if (ret < 0)
		return ret;
	if (CFG_ENCRYPT_IFINDEX) {
		note_obs(TRACE_TO_NETWORK);
		return encrypt_redirect(dst_flags);
	}
	nh.nh_family = 2; /* AF_INET */
	nh.ipv4_nh = next_hop;
	note_obs(TRACE_TO_NETWORK);
	skb->mark = SINEW_MARK_ROUTED;
	ret = bpf_redirect_neigh(CFG_UPLINK_IFINDEX, &nh, sizeof(nh), 0);
	if (ret != TC_ACT_REDIRECT)
		return -DROP_REDIRECT_FAILED;
	return ret;
}

#endif
