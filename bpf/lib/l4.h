/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The L4 part of a flow's tuple, read once for conntrack, NAT and the
 * proxy redirect: TCP, UDP and SCTP ports, and for ICMP the echo
 * identifier or the message type.
 */
#ifndef SINEW_L4_H
#define SINEW_L4_H

#include "common.h"

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

/* The first four bytes of TCP, UDP and SCTP headers alike. */
struct l4_ports {
	__u16 sport;
	__u16 dport;
};

/* A flow's L4 tuple, ports in network order. */
struct l4_tuple {
	/* ICMP echo request: the identifier. */
	__u16 sport;
	/* ICMP echo reply: the identifier; other ICMP: the type (policy
	 * matches ICMP by type). */
	__u16 dport;
	__u8 tcp_flags;
	__u8 icmp_echo; /* 1 for an echo request or reply */
	__u8 pad[2];
};

/*
 * Reads the L4 tuple of a protocol proto header at l4_off (at most 60
 * bytes of IP header before it). Returns 1 when the protocol has one
 * (TCP, UDP, SCTP, ICMP), 0 when it has none (t stays zero) and
 * -DROP_INVALID_PACKET when the header is cut short.
 */
static __always_inline int l4_parse(struct __sk_buff *skb, __u32 l4_off,
				    __u8 proto, struct l4_tuple *t)
{
	if (l4_off > IP_OFF + 60)
		return -DROP_INVALID_PACKET;
	switch (proto) {
	case IPPROTO_TCP: {
		__u8 *flags = PKT_PTR(skb, l4_off + 13, __u8);
		struct l4_ports *l4 = PKT_PTR(skb, l4_off, struct l4_ports);

		if (!l4 || !flags)
			return -DROP_INVALID_PACKET;
		t->sport = l4->sport;
		t->dport = l4->dport;
		t->tcp_flags = *flags;
		return 1;
	}
	case IPPROTO_UDP:
	case IPPROTO_SCTP: {
		struct l4_ports *l4 = PKT_PTR(skb, l4_off, struct l4_ports);

		if (!l4)
			return -DROP_INVALID_PACKET;
		t->sport = l4->sport;
		t->dport = l4->dport;
		return 1;
	}
	case IPPROTO_ICMP: {
		struct icmphdr *icmp = PKT_PTR(skb, l4_off, struct icmphdr);

		if (!icmp)
			return -DROP_INVALID_PACKET;
		if (icmp->type == ICMP_ECHO) {
			t->sport = icmp->un.echo.id;
			t->icmp_echo = 1;
		} else if (icmp->type == ICMP_ECHOREPLY) {
			t->dport = icmp->un.echo.id;
			t->icmp_echo = 1;
		} else {
			t->dport = bpf_htons(icmp->type);
		}
		return 1;
	}
	default:
		return 0;
	}
}

#endif
