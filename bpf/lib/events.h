/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Flow events: drops always, forwarded packets at flow boundaries, policy
 * verdicts on new connections. A record that does not fit in the ring is
 * counted per type; nothing is lost without a count.
 */
#ifndef SINEW_EVENTS_H
#define SINEW_EVENTS_H

#include "maps.h"

#define TCP_FLAGS_BOUNDARY (0x01 | 0x02 | 0x04) /* FIN, SYN, RST */

static __always_inline struct event_scratch *scratch(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&sinew_scratch, &zero);
}

/* Called at each program's entry with the program's HOOK_*: a policy
 * verdict is decided deep inside (policy_enforce, local_deliver) and names
 * the program that ran it. */
static __always_inline void events_begin(__u8 hook)
{
	struct event_scratch *s;

	if (!CFG_EVENTS_ENABLED)
		return;
	s = scratch();
	if (s) {
		__builtin_memset(s, 0, sizeof(*s));
		s->hook = hook;
	}
}

static __always_inline void note_obs(__u8 obs)
{
	struct event_scratch *s;

	if (!CFG_EVENTS_ENABLED)
		return;
	s = scratch();
	if (s)
		s->obs = obs;
}

static __always_inline void note_policy(__u32 ep_id, __u32 peer, __u32 rule)
{
	struct event_scratch *s;

	if (!CFG_EVENTS_ENABLED)
		return;
	s = scratch();
	if (s) {
		s->ep_id = ep_id;
		s->peer_identity = peer;
		s->rule_id = rule;
	}
}

static __always_inline void events_lost(__u32 type)
{
	__u64 *n = bpf_map_lookup_elem(&sinew_events_lost, &type);

	if (n)
		*n += 1;
}

/* Fills the tuple from an IPv4 packet whose IP header is outer bytes after
 * the usual place (in a tunnel); 0 when it is not one. */
static __always_inline int event_tuple(struct __sk_buff *skb,
				       struct flow_event *e, __u32 outer)
{
	struct iphdr *ip;
	__u32 l4;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return 0;
	if (outer != 0 && outer != VXLAN_ENCAP_LEN)
		return 0;
	ip = PKT_PTR(skb, IP_OFF + outer, struct iphdr);
	if (!ip)
		return 0;
	e->saddr = ip->saddr;
	e->daddr = ip->daddr;
	e->proto = ip->protocol;
	if (ip->frag_off & bpf_htons(0x1fff))
		return 1;
	l4 = IP_OFF + outer + ip->ihl * 4;
	if (l4 > IP_OFF + VXLAN_ENCAP_LEN + 60)
		return 1;
	if (ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP ||
	    ip->protocol == IPPROTO_SCTP) {
		__u16 *ports = PKT_PTR(skb, l4, __u16);
		__u8 *flags;

		if (!ports)
			return 1;
		e->sport = ports[0];
		if ((void *)(ports + 2) >
		    (void *)(long)SKB_LOAD32(skb, data_end))
			return 1;
		e->dport = ports[1];
		if (ip->protocol == IPPROTO_TCP) {
			flags = PKT_PTR(skb, l4 + 13, __u8);
			if (flags)
				e->tcp_flags = *flags;
		}
	} else if (ip->protocol == IPPROTO_ICMP) {
		struct icmphdr *icmp = PKT_PTR(skb, l4, struct icmphdr);

		if (icmp) {
			e->sport = icmp->type;
			e->dport = icmp->code;
		}
	}
	return 1;
}

/*
 * No wakeup per record: the consumer polls every few milliseconds and is
 * woken early only when a quarter of the ring is waiting. A wakeup per
 * record (irq_work on every event) cost a third of the connection rate.
 */
static __always_inline void event_submit(const struct flow_event *e)
{
	__u64 avail = bpf_ringbuf_query(&sinew_events, BPF_RB_AVAIL_DATA);
	__u64 size = bpf_ringbuf_query(&sinew_events, BPF_RB_RING_SIZE);
	__u64 flags = avail > size / 4 ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;

	if (bpf_ringbuf_output(&sinew_events, (void *)e, sizeof(*e), flags) < 0)
		events_lost(e->type);
}

/*
 * Whether a forwarded packet is worth an event; keeps the per-flow counters
 * (one entry per direction and hook). Every flow reports its first packet
 * (TCP: SYN), then one report per interval with the counts since the last
 * one. TCP also reports every SYN, FIN and RST, carrying the counts since
 * the last report; FIN and RST end the entry.
 */
static __always_inline int trace_due(struct flow_event *e, __u32 len)
{
	struct flow_agg_key k = {};
	struct flow_agg *a, fresh = {};
	/* A jiffy is precise enough for report intervals, and cheaper to
	 * read per packet than the clock each event carries. */
	__u64 now = bpf_ktime_get_coarse_ns();
	int tcp = e->proto == IPPROTO_TCP;
	__u8 boundary = tcp ? e->tcp_flags & TCP_FLAGS_BOUNDARY : 0;

	k.saddr = e->saddr;
	k.daddr = e->daddr;
	k.sport = e->sport;
	k.dport = e->dport;
	k.proto = e->proto;
	k.hook = e->hook;
	a = bpf_map_lookup_elem(&sinew_flow_agg, &k);
	if (!a) {
		/* TCP is counted from its SYN: an entry for every packet
		 * after a FIN (the last ACK) would only crowd the table. A
		 * connection older than its entry reports its FIN or RST. */
		if (!tcp || (boundary & 0x02)) {
			fresh.last_report_ns = now;
			bpf_map_update_elem(&sinew_flow_agg, &k, &fresh,
					    BPF_ANY);
		}
		return !tcp || boundary;
	}
	if (boundary) {
		e->packets = a->packets + 1;
		e->bytes = a->bytes + len;
		if (boundary & (0x01 | 0x04)) {
			bpf_map_delete_elem(&sinew_flow_agg, &k);
		} else {
			a->last_report_ns = now;
			a->packets = 0;
			a->bytes = 0;
		}
		return 1;
	}
	__sync_fetch_and_add(&a->packets, 1);
	__sync_fetch_and_add(&a->bytes, len);
	if (now - a->last_report_ns < CFG_EVENT_REPORT_INTERVAL_NS)
		return 0;
	e->packets = a->packets;
	e->bytes = a->bytes;
	a->last_report_ns = now;
	a->packets = 0;
	a->bytes = 0;
	return 1;
}

/* The event for a program's verdict: ret < 0 is a drop reason; the packet
 * is outer bytes of tunnel headers into the frame. */
static __always_inline void event_verdict(struct __sk_buff *skb, int ret,
					  __u32 dir, __u8 hook, __u32 outer)
{
	struct event_scratch *s;
	struct flow_event e = {};

	if (!CFG_EVENTS_ENABLED)
		return;
	/*
	 * Forwarded packets are traced at the pod's edges only: where a pod
	 * sends (from_container), where a packet is delivered to one
	 * (to_container, from_overlay, from_netdev into a pod). The uplink
	 * and tunnel egress would report the same packet again, and the
	 * node's own traffic is not a pod's flow. Decided first: it is most
	 * packets at those hooks, and they should cost nothing more.
	 */
	if (ret >= 0) {
		if (hook == HOOK_TO_NETDEV || hook == HOOK_TO_OVERLAY)
			return;
		if (hook == HOOK_FROM_NETDEV) {
			s = scratch();
			if (!s || s->obs != TRACE_TO_ENDPOINT)
				return;
		}
	}
	e.hook = hook;
	e.dir = dir;
	e.ifindex = skb->ifindex;
	e.len = skb->len - outer;
	if (!event_tuple(skb, &e, outer))
		return; /* not IPv4: counted in metrics only */
	s = scratch();
	if (s) {
		e.ep_id = s->ep_id;
		e.peer_identity = s->peer_identity;
		e.rule_id = s->rule_id;
		e.obs = s->obs;
	}
	if (ret < 0) {
		e.type = EVENT_DROP;
		e.verdict = VERDICT_DROPPED;
		e.reason = -ret;
		e.packets = 1;
		e.bytes = e.len;
		e.ts_ns = bpf_ktime_get_ns();
		event_submit(&e);
		return;
	}
	if (!trace_due(&e, e.len))
		return;
	e.type = EVENT_TRACE;
	e.verdict = VERDICT_FORWARDED;
	if (!e.obs)
		e.obs = hook == HOOK_TO_CONTAINER ? TRACE_TO_ENDPOINT
						  : TRACE_TO_STACK;
	if (!e.packets) {
		e.packets = 1;
		e.bytes = e.len;
	}
	e.ts_ns = bpf_ktime_get_ns();
	event_submit(&e);
}

/* A policy decision on a new connection. */
static __always_inline void event_policy(struct __sk_buff *skb, __u32 ep_id,
					 __u8 dir, __u32 peer, int ret,
					 __u32 rule_id, __u8 match)
{
	struct event_scratch *s;
	struct flow_event e = {};

	if (!CFG_EVENTS_ENABLED)
		return;
	s = scratch();
	if (s)
		e.hook = s->hook;
	e.ts_ns = bpf_ktime_get_ns();
	e.type = EVENT_POLICY;
	e.dir =
	    dir == POLICY_DIR_INGRESS ? METRIC_DIR_INGRESS : METRIC_DIR_EGRESS;
	e.ifindex = skb->ifindex;
	e.len = skb->len;
	e.ep_id = ep_id;
	e.peer_identity = peer;
	e.rule_id = rule_id;
	e.match = match;
	e.verdict = ret < 0 ? VERDICT_DROPPED : VERDICT_FORWARDED;
	e.reason = ret < 0 ? -ret : 0;
	e.packets = 1;
	e.bytes = skb->len;
	if (!event_tuple(skb, &e, 0))
		return;
	event_submit(&e);
}

#endif
