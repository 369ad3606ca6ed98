/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Flow events: drops always, forwarded packets counted per flow and
 * reported so that each packet is in exactly one report (trace_due),
 * policy verdicts on new connections. A record that does not fit in the
 * ring is counted per type; nothing is lost without a count.
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
			/* Echo request and reply carry the identifier that
			 * tells one ping from another. */
			if (icmp->type == ICMP_ECHO ||
			    icmp->type == ICMP_ECHOREPLY)
				e->icmp_id = icmp->un.echo.id;
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

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04

/* How long a flow's entry outlives its last packet: a report interval,
 * and at most a second once TCP has said FIN or RST (only the last ACKs
 * are still to come). */
#define FLOW_CLOSE_IDLE_NS 1000000000ULL

#define SINEW_EEXIST 17

/* One packet of len bytes, in flow_agg.acc's units. */
static __always_inline __u64 acc_one(__u32 len)
{
	return (1ULL << FLOW_ACC_PKT_SHIFT) + len;
}

/*
 * Takes the counts for a report and leaves 0. Returns 0 when there is
 * nothing to take, when the entry was retired (whoever retired it reported
 * what it held), or when other CPUs kept adding: the counts then stay for
 * the next report. A compare-and-swap, not an exchange: an exchange could
 * bring a retired entry back to life.
 */
static __always_inline __u64 acc_take(struct flow_agg *a)
{
	__u64 old;
	int i;

#pragma unroll
	for (i = 0; i < 4; i++) {
		old = *(volatile __u64 *)&a->acc;
		if (!old || (old & FLOW_ACC_DEAD))
			return 0;
		if (__sync_val_compare_and_swap(&a->acc, old, 0) == old)
			return old;
	}
	return 0;
}

static __always_inline void event_counts(struct flow_event *e, __u64 v)
{
	e->packets = FLOW_ACC_PKTS(v);
	e->bytes = v & FLOW_ACC_BYTES;
}

/*
 * Whether a forwarded packet is worth an event, with the packets and bytes
 * the event stands for in e (this packet alone unless it takes more).
 * Every packet is counted in exactly one report:
 * - a flow's first packet reports itself (TCP: a SYN, FIN or RST; other
 *   TCP packets without an entry, of a connection older than it, start
 *   one quietly);
 * - a TCP SYN, FIN or RST reports the counts since the last report,
 *   itself included; FIN and RST leave the entry closing, so that the
 *   last ACKs are counted too;
 * - any other packet adds to the entry, and the first one an interval
 *   after the last report takes the counts;
 * - what is left when packets stop is taken by the agent's flush
 *   (flush_flows), which also retires entries idle for an interval;
 * - a packet that finds no room in the table, or an entry being retired,
 *   reports itself.
 */
static __always_inline int trace_due(struct flow_event *e, __u32 len)
{
	struct flow_agg_key k = {};
	struct flow_agg *a;
	/* A jiffy is precise enough for report intervals, and cheaper to
	 * read per packet than the clock each event carries. */
	__u64 now = bpf_ktime_get_coarse_ns();
	__u64 one = acc_one(len), old, v;
	int tcp = e->proto == IPPROTO_TCP;
	__u8 boundary = tcp ? e->tcp_flags & TCP_FLAGS_BOUNDARY : 0;
	long err;

	e->packets = 1;
	e->bytes = len;
	k.saddr = e->saddr;
	k.daddr = e->daddr;
	k.sport = e->sport;
	k.dport = e->dport;
	k.proto = e->proto;
	k.hook = e->hook;
	k.icmp_id = e->icmp_id;
	a = bpf_map_lookup_elem(&sinew_flow_agg, &k);
	if (!a) {
		struct flow_agg fresh = {};
		int report = !tcp || boundary;

		fresh.acc = report ? 0 : one;
		fresh.last_seen_ns = now;
		fresh.last_report_ns = now;
		fresh.ifindex = e->ifindex;
		fresh.ep_id = e->ep_id;
		fresh.peer_identity = e->peer_identity;
		fresh.dir = e->dir;
		fresh.obs = e->obs;
		fresh.state =
		    boundary & (TCP_FIN | TCP_RST) ? FLOW_CLOSING : FLOW_OPEN;
		/* NOEXIST: a packet of the same flow on another CPU may have
		 * made the entry a moment ago; overwriting it would lose
		 * what it counted. */
		err = bpf_map_update_elem(&sinew_flow_agg, &k, &fresh,
					  BPF_NOEXIST);
		if (!err)
			return report;
		if (err != -SINEW_EEXIST)
			return 1; /* table full */
		a = bpf_map_lookup_elem(&sinew_flow_agg, &k);
		if (!a)
			return 1;
	}
	if (a->last_seen_ns != now)
		a->last_seen_ns = now;
	old = __sync_fetch_and_add(&a->acc, one);
	if (old & FLOW_ACC_DEAD)
		return 1; /* retired by the flush: not in its report */
	if (boundary) {
		a->state =
		    boundary & (TCP_FIN | TCP_RST) ? FLOW_CLOSING : FLOW_OPEN;
	} else if (now - a->last_report_ns < CFG_EVENT_REPORT_INTERVAL_NS &&
		   FLOW_ACC_PKTS(old) < FLOW_ACC_PKTS_MAX &&
		   (old & FLOW_ACC_BYTES) < FLOW_ACC_BYTES_MAX) {
		return 0;
	}
	v = acc_take(a);
	if (!v)
		return 0; /* taken, this packet with it, by another report */
	a->last_report_ns = now;
	event_counts(e, v);
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
	if (!e.obs)
		e.obs = hook == HOOK_TO_CONTAINER ? TRACE_TO_ENDPOINT
						  : TRACE_TO_STACK;
	if (!trace_due(&e, e.len))
		return;
	e.type = EVENT_TRACE;
	e.verdict = VERDICT_FORWARDED;
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
