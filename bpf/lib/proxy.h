/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The L7 redirect: a connection whose policy entry carries a proxy port is
 * handed to sinew-proxy's transparent listener on this node with
 * bpf_sk_assign, at TC ingress (from_container for the source's egress
 * rules, local delivery for the destination's ingress rules). The packet
 * keeps its addresses, so the proxy's accepted socket has the original
 * destination as its local address; SINEW_MARK_TO_PROXY makes the agent's
 * ip rule route it locally. The proxy's own upstream packets carry a proxy
 * mark: never redirected again, and judged as the identity the mark names.
 */
#ifndef SINEW_PROXY_H
#define SINEW_PROXY_H

#include "common.h"
#include "l4.h"
#include "events.h"

/* The client identity a proxy upstream mark names; 0 when mark is not one. */
static __always_inline int proxy_mark_identity(__u32 mark, __u32 *identity)
{
	if ((mark & PROXY_MARK_MAGIC_MASK) != PROXY_MARK_MAGIC)
		return 0;
	*identity = mark & PROXY_MARK_ID_MASK;
	if (mark & PROXY_MARK_CIDR)
		*identity += SINEW_IDENTITY_MIN_CIDR;
	return 1;
}

/*
 * Assigns the packet to the proxy: to the connection's own socket when the
 * proxy has one for it (the handshake under way or done), else to the
 * listener on port. No listener: dropped as DROP_PROXY_UNAVAILABLE (fail
 * closed), never delivered around the proxy. Returns TC_ACT_OK or a
 * negative drop reason. Only
 * valid at TC ingress, in the proxy's network namespace (the node's).
 */
static __always_inline int proxy_redirect(struct __sk_buff *skb, __u16 port)
{
	struct bpf_sock_tuple tuple = {};
	struct l4_tuple t = {};
	struct bpf_sock *sk;
	struct iphdr *ip;
	int ret;

	ip = PKT_PTR(skb, IP_OFF, struct iphdr);
	if (!ip)
		return -DROP_INVALID_PACKET;
	/* The agent gives TCP entries a proxy port, and only those. */
	if (ip->protocol != IPPROTO_TCP || ipv4_is_fragment(ip))
		return -DROP_PROXY_UNAVAILABLE;
	tuple.ipv4.saddr = ip->saddr;
	tuple.ipv4.daddr = ip->daddr;
	ret = l4_parse(skb, IP_OFF + ip->ihl * 4, IPPROTO_TCP, &t);
	if (ret < 0)
		return ret;
	tuple.ipv4.sport = t.sport;
	tuple.ipv4.dport = t.dport;

	sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4),
				BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		/* A listener on the original port is not the proxy, and a
		 * TIME_WAIT socket gives a new SYN to that listener. */
		if (sk->state != BPF_TCP_LISTEN &&
		    sk->state != BPF_TCP_TIME_WAIT)
			goto assign;
		bpf_sk_release(sk);
	}
	tuple.ipv4.dport = bpf_htons(port);
	sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4),
				BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return -DROP_PROXY_UNAVAILABLE;
	if (sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return -DROP_PROXY_UNAVAILABLE;
	}
assign:
	/* Fails only outside a TC ingress hook or the socket's netns: a
	 * datapath fault, not a missing proxy. */
	ret = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (ret < 0)
		return -DROP_REDIRECT_FAILED;
	/* A frame decapsulated by the VXLAN device carries the inner MACs,
	 * which are not the device's: the stack would drop it as meant for
	 * another host. It is for this host now. */
	if (skb->pkt_type != PACKET_HOST &&
	    bpf_skb_change_type(skb, PACKET_HOST) < 0)
		return -DROP_REDIRECT_FAILED;
	skb->mark = SINEW_MARK_TO_PROXY;
	note_obs(TRACE_TO_PROXY);
	return TC_ACT_OK;
}

#endif
