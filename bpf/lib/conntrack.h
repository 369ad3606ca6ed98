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
#include "l4.h"

#define CT_REFRESH_NS                                                          \
	(1000ULL * 1000 * 1000) /* write last_seen at most 1/s                 \
				 */

/* The tuple of an IPv4 packet; *tcp_flags gets the TCP flags byte. */
static __always_inline int ct_tuple4(struct __sk_buff *skb, struct iphdr *ip,
				     struct ct_key *key, __u8 *tcp_flags)
{
	struct l4_tuple t = {};
	int ret;

	key->saddr = ip->saddr;
	key->daddr = ip->daddr;
	key->proto = ip->protocol;
	*tcp_flags = 0;
	/* Later fragments carry no ports: they are tracked port-less. */
	if (ip->frag_off & bpf_htons(0x1fff))
		return 0;
	ret = l4_parse(skb, IP_OFF + ip->ihl * 4, ip->protocol, &t);
	if (ret < 0)
		return ret;
	key->sport = t.sport;
	key->dport = t.dport;
	*tcp_flags = t.tcp_flags;
	return 0;
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
