/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Service load balancing: the service, slot, backend, Maglev, affinity and
 * reverse maps, and backend selection. The agent writes a service's
 * backends before its slots and its slots before the service entry, so a
 * lookup that finds a service always finds the backends it points at.
 */
#ifndef SINEW_LB_H
#define SINEW_LB_H

#include "common.h"
#include "maps.h"

#define LB_SERVICES_MAX_ENTRIES 65536
#define LB_BACKENDS_MAX_ENTRIES 65536
#define LB_SLOTS_MAX_ENTRIES	262144
#define LB_MAGLEV_MAX_ENTRIES	(16381 * 64) /* overridden by the agent */
#define LB_AFFINITY_MAX_ENTRIES 65536
#define LB_REVNAT_MAX_ENTRIES	262144

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb_svc_key);
	__type(value, struct lb_svc_value);
	__uint(max_entries, LB_SERVICES_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sinew_lb_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb_slot_key);
	__type(value, __u32);
	__uint(max_entries, LB_SLOTS_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sinew_lb_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct lb_backend);
	__uint(max_entries, LB_BACKENDS_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sinew_lb_backends SEC(".maps");

/* Every Maglev service's table in one hash: {svc_id, index} -> backend.
 * One entry per write keeps each update atomic, and a backend change
 * rewrites only the entries that move. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb_maglev_key);
	__type(value, __u32);
	__uint(max_entries, LB_MAGLEV_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sinew_lb_maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb_affinity_key);
	__type(value, struct lb_affinity_value);
	__uint(max_entries, LB_AFFINITY_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sinew_lb_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb_revnat_key);
	__type(value, struct lb_revnat_value);
	__uint(max_entries, LB_REVNAT_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sinew_lb_revnat SEC(".maps");

/* A 32-bit mix (the murmur3 finaliser), enough to spread flows over a
 * table; not a defence against chosen inputs. */
static __always_inline __u32 lb_mix(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

static __always_inline __u32 lb_hash(__u32 a, __u32 b, __u32 c, __u32 d)
{
	__u32 h = lb_mix(a ^ 0x9e3779b9);

	h = lb_mix(h ^ b);
	h = lb_mix(h ^ c);
	return lb_mix(h ^ d);
}

/* A backend the service may pick for a new connection, or NULL. */
static __always_inline struct lb_backend *lb_backend_usable(__u32 id,
							    __u32 svc_id)
{
	struct lb_backend *be = bpf_map_lookup_elem(&sinew_lb_backends, &id);

	if (!be || be->svc_id != svc_id || !(be->flags & LB_BE_F_ACTIVE))
		return 0;
	return be;
}

/*
 * Picks a backend id for a new flow of svc: Maglev by `hash`, or random
 * over the slots. 0 means none.
 */
static __always_inline __u32 lb_select(const struct lb_svc_value *svc,
				       __u32 hash)
{
	__u32 *id;

	if (svc->flags & LB_F_MAGLEV) {
		struct lb_maglev_key mk = {};

		mk.svc_id = svc->svc_id;
		mk.index =
		    CFG_MAGLEV_TABLE_SIZE ? hash % CFG_MAGLEV_TABLE_SIZE : 0;
		id = bpf_map_lookup_elem(&sinew_lb_maglev, &mk);
	} else {
		struct lb_slot_key sk = {};

		sk.svc_id = svc->svc_id;
		sk.slot = bpf_get_prandom_u32() % svc->count + 1;
		id = bpf_map_lookup_elem(&sinew_lb_slots, &sk);
	}
	return id ? *id : 0;
}

/* Counts a refused connection or datagram (no packet exists yet). */
static __always_inline void lb_count_refused(void)
{
	__u32 idx = DROP_NO_SERVICE_BACKEND * 2 + METRIC_DIR_EGRESS;
	struct metrics_value *m = bpf_map_lookup_elem(&sinew_metrics, &idx);

	if (m)
		m->packets++;
}

#endif
