// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The flow flush, attached nowhere: the agent's observer runs it through
 * BPF_PROG_TEST_RUN every few hundred milliseconds (the frame it is given
 * is ignored). It walks sinew_flow_agg and reports the counts of flows
 * whose last report is an interval old, and of idle flows, which it
 * retires, so that the last packets of a flow are reported without a
 * later packet (see flush_one in lib/events.h). Being BPF, it takes the
 * counts with the same atomic operations the datapath adds them with;
 * user space could only read and delete, and lose what was added between.
 *
 * Returns the number of reports it wrote, with FLUSH_MORE set when it
 * stopped early: a flush writes its reports while the agent's reader
 * waits for it, so once half of the event ring is waiting it leaves the
 * rest of the table (counts keep accumulating, nothing is lost) for a run
 * after the agent has drained the ring. Many flows due at once (up to the
 * table's 65,536) would otherwise overflow any ring of a few MiB.
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/events.h"

/*
 * The agent's flush, for one entry (a bpf_for_each_map_elem callback):
 * reports the counts of a flow whose last report is an interval old, and
 * retires an entry whose last packet is (closing TCP: a second): marks it
 * dead with an atomic exchange, reports what it held and deletes it. A
 * packet that still adds to it sees the mark and reports itself. A flush
 * report is a trace event with the counts since the last report, the
 * endpoint, interface and direction of the flow's first packet, and no
 * packet of its own (len 0, no TCP flags).
 */
struct flush_ctx {
	__u64 now;
	__u32 reports;
	__u32 more;
};

/* Half of the event ring waits for the reader. */
static __always_inline int ring_half_full(void)
{
	return bpf_ringbuf_query(&sinew_events, BPF_RB_AVAIL_DATA) >
	       bpf_ringbuf_query(&sinew_events, BPF_RB_RING_SIZE) / 2;
}

static long flush_one(void *map, struct flow_agg_key *k, struct flow_agg *a,
		      struct flush_ctx *c)
{
	__u64 idle_after = CFG_EVENT_REPORT_INTERVAL_NS;
	__u64 seen = a->last_seen_ns, v;
	struct flow_event e = {};
	int idle;

	if (a->state == FLOW_CLOSING && idle_after > FLOW_CLOSE_IDLE_NS)
		idle_after = FLOW_CLOSE_IDLE_NS;
	idle = c->now > seen && c->now - seen >= idle_after;
	if (!idle &&
	    (c->now < a->last_report_ns ||
	     c->now - a->last_report_ns < CFG_EVENT_REPORT_INTERVAL_NS))
		return 0;
	/* Due: untouched until the next run if the ring has no room. */
	if (ring_half_full()) {
		c->more = 1;
		return 1;
	}
	if (idle) {
		v = __sync_lock_test_and_set(&a->acc, FLOW_ACC_DEAD);
		bpf_map_delete_elem(&sinew_flow_agg, k);
		if (!v || (v & FLOW_ACC_DEAD))
			return 0;
	} else {
		v = acc_take(a);
		if (!v)
			return 0;
		a->last_report_ns = c->now;
	}
	e.ts_ns = bpf_ktime_get_ns();
	e.type = EVENT_TRACE;
	e.verdict = VERDICT_FORWARDED;
	e.saddr = k->saddr;
	e.daddr = k->daddr;
	e.sport = k->sport;
	e.dport = k->dport;
	e.proto = k->proto;
	e.hook = k->hook;
	e.icmp_id = k->icmp_id;
	e.ifindex = a->ifindex;
	e.ep_id = a->ep_id;
	e.peer_identity = a->peer_identity;
	e.dir = a->dir;
	e.obs = a->obs;
	event_counts(&e, v);
	event_submit(&e);
	c->reports++;
	return 0;
}

SEC("classifier")
int flush_flows(struct __sk_buff *skb)
{
	struct flush_ctx c = {};

	if (!CFG_EVENTS_ENABLED)
		return 0;
	c.now = bpf_ktime_get_coarse_ns();
	bpf_for_each_map_elem(&sinew_flow_agg, flush_one, &c, 0);
	return c.reports | (c.more ? FLUSH_MORE : 0);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
