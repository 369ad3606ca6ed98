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
#include "maps.h"

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
 * Hands the packet to sk (a reference the caller took, released here) and
 * makes the stack deliver it on this node. Fails only outside a TC ingress
 * hook or the socket's netns: a datapath fault, not a missing proxy.
 */
static __always_inline int proxy_assign(struct __sk_buff *skb,
					struct bpf_sock *sk)
{
	int ret = bpf_sk_assign(skb, sk, 0);

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

/* Whether the proxy listens on port (tuple's destination port is the
 * original one and is left as it was). */
static __always_inline int
proxy_listening(struct __sk_buff *skb, struct bpf_sock_tuple *tuple, __u16 port)
{
	struct bpf_sock_tuple lt = *tuple;
	struct bpf_sock *l;
	int ok;

	lt.ipv4.dport = bpf_htons(port);
	l = bpf_skc_lookup_tcp(skb, &lt, sizeof(lt.ipv4), BPF_F_CURRENT_NETNS,
			       0);
	if (!l)
		return 0;
	ok = l->state == BPF_TCP_LISTEN;
	bpf_sk_release(l);
	return ok;
}

/*
 * A packet for a tuple whose socket is in TIME_WAIT goes to that socket,
 * which is what the kernel does without a redirect. A new SYN there makes
 * the kernel retire the TIME_WAIT and look up a listener for the original
 * destination: sinew_proxy_tw names the proxy's for the sk_lookup program.
 */
static __always_inline int proxy_via_time_wait(struct __sk_buff *skb,
					       struct bpf_sock *tw,
					       struct bpf_sock_tuple *tuple,
					       const struct l4_tuple *t,
					       __u16 port)
{
	struct proxy_tw_key key = {
	    .saddr = tuple->ipv4.saddr,
	    .daddr = tuple->ipv4.daddr,
	    .sport = tuple->ipv4.sport,
	    .dport = tuple->ipv4.dport,
	};
	__u32 listener = port;

	if ((t->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN)
		bpf_map_update_elem(&sinew_proxy_tw, &key, &listener, BPF_ANY);
	return proxy_assign(skb, tw);
}

/*
 * For a SYN to the ingress proxy, records tuple -> src_identity in
 * sinew_proxy_src: the identity this node judged the client as (the VNI's
 * across nodes), which the proxy cannot tell from the client's address
 * when the client is another node's proxy. Best effort: a failed update
 * leaves the proxy with the address's identity, which fails closed.
 */
static __always_inline void proxy_note_source(struct __sk_buff *skb,
					      __u32 src_identity)
{
	struct proxy_tw_key key = {};
	struct l4_tuple t = {};
	struct iphdr *ip;

	ip = PKT_PTR(skb, IP_OFF, struct iphdr);
	if (!ip || ip->protocol != IPPROTO_TCP || ipv4_is_fragment(ip))
		return;
	key.saddr = ip->saddr;
	key.daddr = ip->daddr;
	if (l4_parse(skb, IP_OFF + ip->ihl * 4, IPPROTO_TCP, &t) < 0)
		return;
	if ((t.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN)
		return;
	key.sport = t.sport;
	key.dport = t.dport;
	bpf_map_update_elem(&sinew_proxy_src, &key, &src_identity, BPF_ANY);
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
		/* The proxy's own socket for this connection. */
		if (sk->state != BPF_TCP_LISTEN &&
		    sk->state != BPF_TCP_TIME_WAIT)
			goto assign;
		/* A TIME_WAIT of an earlier connection on this tuple (the
		 * proxy closed first and the client reused its port): the
		 * kernel refuses a new connection that bypasses it, so the
		 * packet goes to it and sinew_proxy_tw tells the listener
		 * lookup that follows a new SYN which listener to use. A
		 * listener on the original port is not the proxy. */
		if (sk->state == BPF_TCP_TIME_WAIT &&
		    proxy_listening(skb, &tuple, port))
			return proxy_via_time_wait(skb, sk, &tuple, &t, port);
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
	return proxy_assign(skb, sk);
}

#endif
