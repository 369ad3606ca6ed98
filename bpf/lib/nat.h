/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Masquerade: pods reach addresses outside the cluster with the node's
 * address. Both directions of a flow live in sinew_nat (an LRU, so a full
 * table evicts the oldest flows rather than refusing new ones); the source
 * port is chosen from CFG_NAT_PORT_MIN..MAX, which the agent reserves from
 * the node's own ephemeral ports.
 */
#ifndef SINEW_NAT_H
#define SINEW_NAT_H

#include "maps.h"
#include "l4.h"

#define L4_OFF	       (IP_OFF + (int)sizeof(struct iphdr))
#define NAT_PORT_TRIES 16

/* Fills key from the packet. ICMP: echo only, identifier in the port slot
 * that the direction names (sport for requests, dport for replies). */
static __always_inline int nat_key_from_packet(struct __sk_buff *skb,
					       struct iphdr *ip,
					       struct nat_key *key)
{
	struct l4_tuple t = {};
	int ret;

	key->saddr = ip->saddr;
	key->daddr = ip->daddr;
	key->proto = ip->protocol;
	if (ip->ihl != 5)
		return -DROP_IP_OPTIONS;
	if (ipv4_is_fragment(ip))
		return -DROP_FRAGMENT;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP &&
	    ip->protocol != IPPROTO_ICMP)
		return -DROP_UNSUPPORTED_L4;
	ret = l4_parse(skb, L4_OFF, ip->protocol, &t);
	if (ret < 0)
		return ret;
	if (ip->protocol == IPPROTO_ICMP && !t.icmp_echo)
		return -DROP_UNSUPPORTED_L4;
	key->sport = t.sport;
	key->dport = t.dport;
	return 0;
}

static __always_inline int nat_l4_csum_off(__u8 proto, __u32 *flags)
{
	switch (proto) {
	case IPPROTO_TCP:
		*flags = 0;
		return L4_OFF + offsetof(struct tcphdr, check);
	case IPPROTO_UDP:
		*flags = BPF_F_MARK_MANGLED_0;
		return L4_OFF + offsetof(struct udphdr, check);
	default:
		*flags = 0;
		return L4_OFF + offsetof(struct icmphdr, checksum);
	}
}

/*
 * Rewrites one address (source when src is set) and one port (or the ICMP
 * identifier), fixing the IP and L4 checksums.
 */
static __always_inline int nat_rewrite(struct __sk_buff *skb, __u8 proto,
				       int src, __u32 old_addr, __u32 new_addr,
				       __u16 old_port, __u16 new_port)
{
	int addr_off = IP_OFF + (src ? offsetof(struct iphdr, saddr)
				     : offsetof(struct iphdr, daddr));
	int port_off;
	__u32 csum_flags;
	int csum_off = nat_l4_csum_off(proto, &csum_flags);

	if (proto == IPPROTO_ICMP)
		port_off = L4_OFF + offsetof(struct icmphdr, un.echo.id);
	else
		port_off = L4_OFF + (src ? 0 : 2);

	if (bpf_l3_csum_replace(skb, IP_OFF + offsetof(struct iphdr, check),
				old_addr, new_addr, 4) < 0)
		return -DROP_CSUM_FAILED;
	/* ICMP has no pseudo-header: only the identifier counts. */
	if (proto != IPPROTO_ICMP &&
	    bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr,
				csum_flags | BPF_F_PSEUDO_HDR | 4) < 0)
		return -DROP_CSUM_FAILED;
	if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port,
				csum_flags | 2) < 0)
		return -DROP_CSUM_FAILED;
	if (bpf_skb_store_bytes(skb, addr_off, &new_addr, 4, 0) < 0)
		return -DROP_INVALID_PACKET;
	if (bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0) < 0)
		return -DROP_INVALID_PACKET;
	return 0;
}

static __always_inline void nat_reverse_key(const struct nat_key *out,
					    __u16 nat_port, struct nat_key *rev)
{
	rev->saddr = out->daddr;
	rev->daddr = CFG_NODE_IP;
	rev->sport = out->dport;
	rev->dport = nat_port;
	rev->proto = out->proto;
}

/* Source NAT of a packet leaving the node; key was filled from it. */
static __always_inline int nat_snat(struct __sk_buff *skb,
				    const struct nat_key *key)
{
	struct nat_value *fwd = bpf_map_lookup_elem(&sinew_nat, key);
	struct nat_value out = {}, in = {};
	struct nat_key rev = {};
	__u32 range = CFG_NAT_PORT_MAX - CFG_NAT_PORT_MIN + 1;
	__u32 start;
	int i;

	in.addr = key->saddr;
	in.port = key->sport;
	/* A reply of a connection opened from outside: leave it alone. */
	if (fwd && fwd->addr == key->saddr && fwd->port == key->sport)
		return 0;
	if (fwd) {
		out = *fwd;
		/* The LRU may have evicted the reply direction alone. */
		nat_reverse_key(key, out.port, &rev);
		if (!bpf_map_lookup_elem(&sinew_nat, &rev)) {
			in.created_ns = out.created_ns;
			bpf_map_update_elem(&sinew_nat, &rev, &in, BPF_ANY);
		}
		goto rewrite;
	}

	out.addr = CFG_NODE_IP;
	out.created_ns = bpf_ktime_get_ns();
	in.created_ns = out.created_ns;
	start = bpf_get_prandom_u32();
	for (i = 0; i < NAT_PORT_TRIES; i++) {
		__u16 port = CFG_NAT_PORT_MIN + (start + i) % range;

		out.port = bpf_htons(port);
		nat_reverse_key(key, out.port, &rev);
		if (bpf_map_update_elem(&sinew_nat, &rev, &in, BPF_NOEXIST) ==
		    0)
			break;
	}
	if (i == NAT_PORT_TRIES)
		return -DROP_NAT_NO_PORT;
	if (bpf_map_update_elem(&sinew_nat, key, &out, BPF_ANY) < 0) {
		bpf_map_delete_elem(&sinew_nat, &rev);
		return -DROP_NAT_NO_PORT;
	}
rewrite:
	return nat_rewrite(skb, key->proto, 1, key->saddr, out.addr, key->sport,
			   out.port);
}

/*
 * A host outside the cluster opened a connection to a local pod (native
 * routing, or a router that knows the pod CIDRs). Its replies must leave
 * with the pod's address: an identity entry for the reply direction tells
 * nat_snat to leave them alone. Called after the packet was accepted.
 */
static __always_inline void nat_note_inbound(struct __sk_buff *skb)
{
	struct iphdr *ip = PKT_PTR(skb, IP_OFF, struct iphdr);
	struct nat_key in = {}, out = {};
	struct nat_value v = {};

	if (!ip || nat_key_from_packet(skb, ip, &in) < 0)
		return;
	out.saddr = in.daddr;
	out.daddr = in.saddr;
	out.sport = in.dport;
	out.dport = in.sport;
	out.proto = in.proto;
	if (bpf_map_lookup_elem(&sinew_nat, &out))
		return;
	v.addr = out.saddr;
	v.port = out.sport;
	v.created_ns = bpf_ktime_get_ns();
	bpf_map_update_elem(&sinew_nat, &out, &v, BPF_ANY);
}

/* Reverse NAT of a reply arriving at the node address. Returns 1 when the
 * packet was translated, 0 when it is not ours. */
static __always_inline int
nat_rev_dnat(struct __sk_buff *skb, const struct nat_key *key, __u32 *pod_addr)
{
	struct nat_value *v = bpf_map_lookup_elem(&sinew_nat, key);
	int ret;

	if (!v)
		return 0;
	*pod_addr = v->addr;
	ret = nat_rewrite(skb, key->proto, 0, key->daddr, v->addr, key->dport,
			  v->port);
	return ret < 0 ? ret : 1;
}

#endif
