/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Every map of the datapath, pinned by name so that all programs of a node
 * share them and an agent restart re-adopts them.
 */
#ifndef SINEW_MAPS_H
#define SINEW_MAPS_H

#include "common.h"

#define IPCACHE_MAX_ENTRIES    65536
#define ENDPOINTS_MAX_ENTRIES  4096
#define NAT_MAX_ENTRIES	       65536
#define POLICY_MAX_ENTRIES     65536
#define CT_MAX_ENTRIES	       262144
#define CIDR_CLASS_MAX_ENTRIES 16384

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_value);
	__uint(max_entries, IPCACHE_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sinew_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct endpoint_info);
	__uint(max_entries, ENDPOINTS_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sinew_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct nat_key);
	__type(value, struct nat_value);
	__uint(max_entries, NAT_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sinew_nat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct metrics_value);
	__uint(max_entries, METRICS_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sinew_metrics SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
	__uint(max_entries, POLICY_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sinew_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, __u32);
	__uint(max_entries, CIDR_CLASS_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sinew_cidr_class SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_entry);
	__uint(max_entries, CT_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sinew_ct SEC(".maps");

#define FLOW_AGG_MAX_ENTRIES 65536
#define EVENTS_RING_SIZE     (1 << 22) /* overridden by the agent */

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, EVENTS_RING_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sinew_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, EVENT_TYPE_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sinew_events_lost SEC(".maps");

/* A plain hash, not LRU: an evicted entry would take uncounted packets
 * with it. Entries are retired by the agent's flush; a packet that finds
 * the table full reports itself. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct flow_agg_key);
	__type(value, struct flow_agg);
	__uint(max_entries, FLOW_AGG_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sinew_flow_agg SEC(".maps");

/* A new SYN whose tuple still has a TIME_WAIT socket of an earlier proxied
 * connection is handed to that socket, as the kernel would do itself: the
 * kernel then retires the TIME_WAIT and looks for a listener for the
 * original destination, which is where bpf_proxy.c's sk_lookup program
 * answers with the proxy listener this entry names. Client to original
 * destination, addresses and ports in network order. */
struct proxy_tw_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
};

#define PROXY_TW_MAX_ENTRIES 4096

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct proxy_tw_key);
	__type(value, __u32); /* the proxy listener's port, host order */
	__uint(max_entries, PROXY_TW_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sinew_proxy_tw SEC(".maps");

/* Who a connection handed to the ingress proxy comes from, as this
 * node's datapath judged it: tuple (client to original destination, as in
 * sinew_proxy_tw) -> source identity, written for each SYN local_deliver
 * hands to the proxy. The proxy reads it for its accepted socket: across
 * nodes the client is another node's proxy, whose address names the node,
 * while the VNI named the pod it speaks for. */
#define PROXY_SRC_MAX_ENTRIES 16384

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct proxy_tw_key);
	__type(value, __u32); /* source identity */
	__uint(max_entries, PROXY_SRC_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sinew_proxy_src SEC(".maps");

/* The proxy's listeners by port (host order), put there by the agent. A
 * listener that closes leaves the map by itself. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 16);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sinew_proxy_listeners SEC(".maps");

/* Never read or written: it carries struct flow_event (the ring buffer's
 * record, which a ring buffer map cannot name) into BTF, where the layout
 * test compares it with the Rust mirror. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct flow_event);
	__uint(max_entries, 1);
} sinew_event_layout SEC(".maps");

/* What a program learned on the way, for the event its exit emits: one
 * slot per CPU, reset at each program's entry (a TC program runs to its
 * end on one CPU). Not pinned: per program run only. */
struct event_scratch {
	__u32 ep_id;
	__u32 peer_identity;
	__u32 rule_id;
	__u8 obs;
	__u8 hook; /* HOOK_* of the running program */
	__u8 pad[2];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct event_scratch);
	__uint(max_entries, 1);
} sinew_scratch SEC(".maps");

#endif
