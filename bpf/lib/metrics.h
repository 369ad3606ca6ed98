/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Per-reason, per-direction packet and byte counters, and the one drop exit. */
#ifndef SINEW_METRICS_H
#define SINEW_METRICS_H

#include "maps.h"
#include "events.h"

static __always_inline void metrics_add(__u32 reason, __u32 dir, __u32 len)
{
	__u32 idx = reason * 2 + dir;
	struct metrics_value *m;

	m = bpf_map_lookup_elem(&sinew_metrics, &idx);
	if (m) {
		m->packets++;
		m->bytes += len;
	}
}

static __always_inline void metrics_count(struct __sk_buff *skb, __u32 reason,
					  __u32 dir)
{
	metrics_add(reason, dir, skb->len);
}

/*
 * Maps a program's internal result to a TC verdict: a negative value is a
 * drop reason, counted here; anything else is already a verdict.
 */
static __always_inline int finish(struct __sk_buff *skb, int ret, __u32 dir,
				  __u8 hook)
{
	/* An encapsulated packet is counted as the packet it carries. */
	__u32 outer = 0;

	if (ret == RET_ENCAPSULATED) {
		outer = VXLAN_ENCAP_LEN;
		ret = TC_ACT_REDIRECT;
	}
	event_verdict(skb, ret, dir, hook, outer);
	if (ret < 0) {
		__u32 reason = -ret;

		if (reason >= DROP_REASON_MAX)
			reason = DROP_INVALID_PACKET;
		metrics_count(skb, reason, dir);
		return TC_ACT_SHOT;
	}
	metrics_add(REASON_FORWARDED, dir, skb->len - outer);
	return ret;
}

#endif
