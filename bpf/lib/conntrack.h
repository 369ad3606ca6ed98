/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Connection tracking for endpoints under policy. Each endpoint tracks its
 * own connections per direction: a packet passes without a policy lookup
 * when its tuple is tracked in this direction (established) or its reverse
 * tuple is tracked in the other direction (a reply). Entries live in a plain
 * hash so that a full table is an error we count, not a silent eviction;
 * the agent removes idle entries.
 */
#ifndef SINEW_CONNTRACK_H
#define SINEW_CONNTRACK_H

#include "maps.h"

#define CT_REFRESH_NS                                                          \
	(1000ULL * 1000 * 1000) /* write last_seen at most 1/s                 \
				 */

struct ct_l4 {
	__u16 sport;
	__u16 dport;
};

/* The tuple of an IPv4 packet; *tcp_flags gets the TCP flags byte. */
static __always_inline int ct_tuple4(struct __sk_buff *skb, struct iphdr *ip,
				     struct ct_key *key, __u8 *tcp_flags)
{
	__u32 l4_off;

	key->saddr = ip->saddr;
	key->daddr = ip->daddr;
	key->proto = ip->protocol;
	*tcp_flags = 0;
	/* Later fragments carry no ports: they are tracked port-less. */
	if (ip->frag_off & bpf_htons(0x1fff))
		return 0;
	l4_off = IP_OFF + ip->ihl * 4;
	if (l4_off > IP_OFF + 60)
		return -DROP_INVALID_PACKET;
	switch (ip->protocol) {
	case IPPROTO_TCP: {
		__u8 *flags = PKT_PTR(skb, l4_off + 13, __u8);
		struct ct_l4 *l4 = PKT_PTR(skb, l4_off, struct ct_l4);

		if (!l4 || !flags)
			return -DROP_INVALID_PACKET;
		key->sport = l4->sport;
		key->dport = l4->dport;
		*tcp_flags = *flags;
		return 0;
	}
	case IPPROTO_UDP:
	case IPPROTO_SCTP: {
		struct ct_l4 *l4 = PKT_PTR(skb, l4_off, struct ct_l4);

		if (!l4)
			return -DROP_INVALID_PACKET;
		key->sport = l4->sport;
		key->dport = l4->dport;
		return 0;
	}
	case IPPROTO_ICMP: {
		struct icmphdr *icmp = PKT_PTR(skb, l4_off, struct icmphdr);

		if (!icmp)
			return -DROP_INVALID_PACKET;
		if (icmp->type == ICMP_ECHO) {
			key->sport = icmp->un.echo.id;
		} else if (icmp->type == ICMP_ECHOREPLY) {
			key->dport = icmp->un.echo.id;
		} else {
			/* Policy matches ICMP by type, carried in dport. */
			key->dport = bpf_htons(icmp->type);
		}
		return 0;
	}
	default:
		return 0;
	}
}

/* The port policy matches: the destination port, or the ICMP type. */
static __always_inline __u16 ct_policy_port(const struct ct_key *key,
					    struct __sk_buff *skb,
					    struct iphdr *ip)
{
	if (key->proto == IPPROTO_ICMP) {
		struct icmphdr *icmp =
		    PKT_PTR(skb, IP_OFF + ip->ihl * 4, struct icmphdr);

		return icmp ? bpf_htons(icmp->type) : 0;
	}
	return key->dport;
}

static __always_inline void ct_touch(struct ct_entry *e, __u8 tcp_flags,
				     __u64 now)
{
	if (tcp_flags & (0x01 | 0x04)) /* FIN, RST */
		e->flags |= CT_F_CLOSING;
	if (now - e->last_seen_ns > CT_REFRESH_NS)
		e->last_seen_ns = now;
}

static __always_inline void ct_reverse(const struct ct_key *k, struct ct_key *r)
{
	r->saddr = k->daddr;
	r->daddr = k->saddr;
	r->sport = k->dport;
	r->dport = k->sport;
	r->proto = k->proto;
	r->direction = k->direction == POLICY_DIR_INGRESS ? POLICY_DIR_EGRESS
							  : POLICY_DIR_INGRESS;
}

#endif
