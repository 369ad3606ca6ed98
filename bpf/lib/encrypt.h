/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Transparent encryption between nodes: with CFG_ENCRYPT_IFINDEX set, what
 * leaves for another node goes into the WireGuard device (kernel or the
 * agent's userspace one) instead of the uplink. With CFG_ENCRYPT_IPSEC it
 * goes through the stack, whose XFRM policies make ESP of it, and the
 * uplink lets nothing else out for another node. A destination whose node
 * has no known key (no IPCACHE_F_ENCRYPT) is dropped, never sent in clear.
 */
#ifndef SINEW_ENCRYPT_H
#define SINEW_ENCRYPT_H

#include "common.h"
#include "ipcache.h"

/* Into the WireGuard device, or dropped when the peer's key is unknown. */
static __always_inline int encrypt_redirect(__u32 dst_flags)
{
	int ret;

	if (!(dst_flags & IPCACHE_F_ENCRYPT))
		return -DROP_NO_ENCRYPTION_KEY;
	ret = bpf_redirect(CFG_ENCRYPT_IFINDEX, 0);
	if (ret != TC_ACT_REDIRECT)
		return -DROP_REDIRECT_FAILED;
	return ret;
}

/*
 * IPsec, at the uplink's egress: the kernel's XFRM policies have made ESP
 * of what they cover by now, so a packet still in clear that should have
 * been encrypted means a policy is missing (a peer being set up, an agent
 * gone wrong): dropped, never sent. That is pod traffic for another node
 * (to its pod CIDR or pods, or a pod's packet to its address), the VXLAN
 * packets that carry it, and with CFG_ENCRYPT_NODE all node traffic for
 * another node. ESP itself passes.
 */
static __always_inline int ipsec_to_node(struct __sk_buff *skb,
					 struct iphdr *ip, int from_pod)
{
	struct ipcache_value *dst;
	struct udphdr *udp;

	if (ip->protocol == IPPROTO_ESP)
		return 0;
	dst = ipcache_lookup4(ip->daddr);
	if (!dst || !dst->tunnel_endpoint)
		return 0;
	if (dst->flags & (IPCACHE_F_POD_CIDR | IPCACHE_F_REMOTE_EP))
		return -DROP_NO_ENCRYPTION_KEY;
	if (!(dst->flags & IPCACHE_F_NODE))
		return 0;
	/* A pod's packet for another node goes in VXLAN (from_container). */
	if (from_pod || CFG_ENCRYPT_NODE)
		return -DROP_NO_ENCRYPTION_KEY;
	if (ip->protocol != IPPROTO_UDP || ip->ihl != 5)
		return 0;
	udp = PKT_PTR(skb, IP_OFF + sizeof(struct iphdr), struct udphdr);
	if (udp && udp->dest == bpf_htons(SINEW_VXLAN_PORT))
		return -DROP_NO_ENCRYPTION_KEY;
	return 0;
}

/*
 * At the uplink's egress, what leaves for another node through the stack:
 * from a local pod (`from_pod`: to another node's address, e.g. a reply to
 * that node), or from the node itself: the VXLAN device's packets (pod
 * traffic the stack routed), packets to other nodes' pods (node port SNAT,
 * host to pod in native routing), and with CFG_ENCRYPT_NODE everything else
 * but WireGuard itself. Returns 0 to let the packet go, else the verdict.
 */
static __always_inline int encrypt_to_node(struct __sk_buff *skb,
					   struct iphdr *ip, int from_pod)
{
	struct ipcache_value *dst;
	struct udphdr *udp = 0;

	if (CFG_ENCRYPT_IPSEC)
		return ipsec_to_node(skb, ip, from_pod);
	if (!CFG_ENCRYPT_IFINDEX)
		return 0;
	dst = ipcache_lookup4(ip->daddr);
	if (!dst || !dst->tunnel_endpoint)
		return 0;
	if (dst->flags & (IPCACHE_F_POD_CIDR | IPCACHE_F_REMOTE_EP))
		return encrypt_redirect(dst->flags);
	if (!(dst->flags & IPCACHE_F_NODE))
		return 0;
	if (from_pod)
		return encrypt_redirect(dst->flags);
	if (ip->protocol == IPPROTO_UDP && ip->ihl == 5)
		udp =
		    PKT_PTR(skb, IP_OFF + sizeof(struct iphdr), struct udphdr);
	if (udp && (udp->dest == bpf_htons(CFG_WIREGUARD_PORT) ||
		    udp->source == bpf_htons(CFG_WIREGUARD_PORT)))
		return 0;
	if (udp && udp->dest == bpf_htons(SINEW_VXLAN_PORT))
		return encrypt_redirect(dst->flags);
	if (CFG_ENCRYPT_NODE)
		return encrypt_redirect(dst->flags);
	return 0;
}

/*
 * The receive side, at the uplink's ingress. With encryption on, what
 * another node sends this node's pods reaches it only through decryption:
 * WireGuard hands it to the stack from its own device, never through the
 * uplink. IPsec decrypts ESP in the stack; the inner VXLAN packet then goes
 * to the VXLAN socket directly, or (XFRM GRO, with esp4_offload loaded)
 * comes through the uplink's ingress once more, carrying the secpath that
 * XFRM attached. So a VXLAN packet, or another node's pod or node address
 * sending to a pod here, in clear on the uplink was forged on the underlay
 * (or sent by a node that skipped encryption): dropped as
 * DROP_UNENCRYPTED_FROM_PEER, never delivered.
 */
static __always_inline int encrypt_enabled(void)
{
	return CFG_ENCRYPT_IPSEC || CFG_ENCRYPT_IFINDEX;
}

/*
 * Whether XFRM decrypted this packet with one of Sinew's own states: its
 * secpath holds exactly one state, and that state has the agent's reqid.
 * A state someone else installed on the node (another reqid, a key that is
 * not the cluster's) says nothing about who sent the packet, so what it
 * decrypted is treated as clear; so is a packet with a second layer, which
 * Sinew never makes.
 */
static __always_inline int ipsec_decrypted(struct __sk_buff *skb)
{
	struct bpf_xfrm_state xs = {};

	if (!CFG_ENCRYPT_IPSEC)
		return 0;
	if (bpf_skb_get_xfrm_state(skb, 0, &xs, sizeof(xs), 0) < 0 ||
	    xs.reqid != SINEW_IPSEC_REQID)
		return 0;
	return bpf_skb_get_xfrm_state(skb, 1, &xs, sizeof(xs), 0) < 0;
}

/*
 * A VXLAN packet (or the first fragment of one; IP options or not) that
 * arrived in clear: what the kernel's VXLAN socket would otherwise take.
 */
static __always_inline int vxlan_in_clear(struct __sk_buff *skb,
					  struct iphdr *ip)
{
	__be16 dport;

	if (!encrypt_enabled() || ip->protocol != IPPROTO_UDP ||
	    (ip->frag_off & bpf_htons(0x1fff)))
		return 0;
	if (bpf_skb_load_bytes(
		skb, IP_OFF + ip->ihl * 4 + offsetof(struct udphdr, dest),
		&dport, sizeof(dport)) < 0)
		return 0;
	return dport == bpf_htons(SINEW_VXLAN_PORT) && !ipsec_decrypted(skb);
}

/* A packet for a pod here from another node's pod or address, in clear. */
static __always_inline int from_peer_in_clear(struct __sk_buff *skb,
					      const struct ipcache_value *src)
{
	if (!encrypt_enabled() || !src || !src->tunnel_endpoint)
		return 0;
	if (!(src->flags &
	      (IPCACHE_F_NODE | IPCACHE_F_POD_CIDR | IPCACHE_F_REMOTE_EP)))
		return 0;
	return !ipsec_decrypted(skb);
}

/*
 * A packet for this node's own address, in clear: from another node's pod
 * (a pod's traffic for another node always goes through encryption, so a
 * clear one was forged, and a node port would otherwise hand it to a pod
 * here under that pod's identity), or, with CFG_ENCRYPT_NODE, from another
 * node's address, whose traffic for this node all goes through encryption
 * (to_netdev on that node drops what would leave in clear):
 * - WireGuard: all of it into the device, but WireGuard's own UDP (to its
 *   port, the same on every node), which passes;
 * - IPsec: all of it through ESP (the policies between the two node
 *   addresses cover every protocol), so ESP itself passes, and so does
 *   what one of Sinew's states decrypted (the XFRM GRO path hands the
 *   decrypted packet back to the uplink's ingress with its secpath).
 * Not judged: a later fragment (its first one was, and nothing reassembles
 * without it), addresses that are not nodes (external hosts; a node not
 * known yet), anything but IPv4 (ARP).
 */
static __always_inline int to_node_in_clear(struct __sk_buff *skb,
					    struct iphdr *ip)
{
	struct ipcache_value *src;
	__be16 dport;

	if (!encrypt_enabled())
		return 0;
	src = ipcache_lookup4(ip->saddr);
	if (!src || !src->tunnel_endpoint)
		return 0;
	if (src->flags & (IPCACHE_F_POD_CIDR | IPCACHE_F_REMOTE_EP))
		return !ipsec_decrypted(skb);
	if (!(src->flags & IPCACHE_F_NODE) || !CFG_ENCRYPT_NODE ||
	    (ip->frag_off & bpf_htons(0x1fff)))
		return 0;
	if (CFG_ENCRYPT_IPSEC)
		return ip->protocol != IPPROTO_ESP && !ipsec_decrypted(skb);
	/* WireGuard sends to its peers' port, the same on every node. */
	if (ip->protocol == IPPROTO_UDP &&
	    bpf_skb_load_bytes(
		skb, IP_OFF + ip->ihl * 4 + offsetof(struct udphdr, dest),
		&dport, sizeof(dport)) == 0 &&
	    dport == bpf_htons(CFG_WIREGUARD_PORT))
		return 0;
	return 1;
}

#endif
