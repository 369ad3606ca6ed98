/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The ABI between the Sinew datapath and sinew-agent: every struct that
 * crosses a map, every reserved number. Mirrored by crates/abi/src/lib.rs and
 * checked against this object's BTF by a test. Changing a layout means
 * bumping SINEW_ABI_VERSION, which moves the pin path.
 *
 * Rules: explicit pad fields, no bool, no implicit padding, sizes multiple
 * of 8 where a u64 appears.
 */
#ifndef SINEW_ABI_H
#define SINEW_ABI_H

#include <linux/types.h>

#define SINEW_ABI_VERSION 6

/* Reserved identities. Pod identities start at SINEW_IDENTITY_MIN_CLUSTER. */
#define SINEW_IDENTITY_UNKNOWN	   0
#define SINEW_IDENTITY_HOST	   1
#define SINEW_IDENTITY_WORLD	   2
#define SINEW_IDENTITY_UNMANAGED   3
#define SINEW_IDENTITY_HEALTH	   4
#define SINEW_IDENTITY_INIT	   5
#define SINEW_IDENTITY_REMOTE_NODE 6
#define SINEW_IDENTITY_MIN_CLUSTER 256

#define SINEW_FAMILY_V4 4
#define SINEW_FAMILY_V6 6

/*
 * ipcache: LPM trie. prefixlen counts the bits of family+pad (32) plus the
 * address prefix, so one trie holds both families.
 */
struct ipcache_key {
	__u32 prefixlen;
	__u8 family;
	__u8 pad[3];
	__u32 addr[4]; /* network order; IPv4 in addr[0] */
};

#define IPCACHE_F_LOCAL_EP  (1U << 0) /* a pod on this node: ifindex is set */
#define IPCACHE_F_NODE	    (1U << 1) /* a node's own address */
#define IPCACHE_F_POD_CIDR  (1U << 2) /* another node's pod CIDR */
#define IPCACHE_F_REMOTE_EP (1U << 3) /* a pod on another node */
#define IPCACHE_F_ENCRYPT   (1U << 4) /* its node has a WireGuard peer */

struct ipcache_value {
	__u32 identity;
	__u32 tunnel_endpoint; /* network order, 0 when none */
	__u32 ifindex;	       /* host-side veth of a local endpoint */
	__u32 flags;
};

/* endpoint_info.flags */
#define EP_F_INGRESS_ENFORCED                                                  \
	(1U << 0)		       /* some policy selects it for ingress   \
					*/
#define EP_F_EGRESS_ENFORCED (1U << 1) /* ... for egress */
#define EP_F_POLICY_NOT_READY                                                  \
	(1U << 2) /* policy not installed: fail closed                         \
		   */
/* Some CIDR rule of this endpoint applies in that direction: a new flow
 * also looks up the peer address's CIDR class (see cidr_class). */
#define EP_F_CIDR_INGRESS (1U << 3)
#define EP_F_CIDR_EGRESS  (1U << 4)

/*
 * cidr_class: LPM trie, key struct ipcache_key, value __u32. Every prefix a
 * policy names (CIDR peers and their excepts) with its number; the lookup
 * of an address gives its CIDR class, the number of the most specific named
 * prefix holding it, whatever the address is (a pod, a node, the outside).
 * Prefixes are nested or disjoint, so an address lies in a rule's CIDR
 * (or an except) exactly when that prefix holds its class's prefix: the
 * agent gives each endpoint policy entries for exactly the classes that
 * its CIDR rules match, and the datapath needs one lookup per flow.
 */

/* endpoints: hash, key = host-side veth ifindex (__u32). */
struct endpoint_info {
	__u32 ipv4; /* network order */
	__u32 identity;
	__u32 id;
	__u32 flags;
	__u8 pod_mac[6];
	__u8 host_mac[6];
	/* Bumped by the agent on every policy change of this endpoint; a
	 * conntrack entry made under another revision is re-checked. */
	__u32 policy_rev;
};

/*
 * policy: LPM trie, one for all endpoints. ep_id, identity and direction
 * are always matched exactly (prefix >= POLICY_PREFIX_EXACT); proto and
 * dport (network order) may be wildcarded by a shorter prefix. Identity 0
 * means any peer and is looked up separately; deny wins over allow.
 */
#define POLICY_DIR_INGRESS  0
#define POLICY_DIR_EGRESS   1
#define POLICY_ANY_IDENTITY 0
#define POLICY_PREFIX_EXACT 72
#define POLICY_PREFIX_PROTO 80
#define POLICY_PREFIX_FULL  96
#define POLICY_ACTION_ALLOW 1
#define POLICY_ACTION_DENY  2
/* policy_key.identity of an entry for a CIDR class rather than an identity:
 * the class number with this bit set, so the two never share a key. */
#define POLICY_CIDR_CLASS 0x80000000U

struct policy_key {
	__u32 prefixlen;
	__u32 ep_id;
	__u32 identity;
	__u8 direction;
	__u8 proto;
	__u16 dport; /* network order; ICMP: the type */
};

struct policy_value {
	__u32 rule_id; /* the agent's rule index, for drop reasons and trace */
	__u16 proxy_port; /* L7 redirect: the proxy's listener (host order),
			   * 0 = none */
	__u8 action;
	__u8 match; /* MATCH_*: what kind of entry this is, for events */
};

/* conntrack: hash (not LRU: a full table is counted, never silent). */
struct ct_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport; /* ICMP echo: identifier in sport (request) or dport */
	__u16 dport;
	__u8 proto;
	__u8 direction; /* POLICY_DIR_* of the endpoint that tracks it */
	__u16 pad;
};

#define CT_F_CLOSING (1U << 0) /* FIN or RST seen */

struct ct_entry {
	__u64 last_seen_ns;
	__u32 ep_id;
	__u32 policy_rev;
	__u32 rule_id;
	__u8 flags;
	__u8 pad;
	/* The proxy listener (host order) the connection was handed to when
	 * it began, 0 = none: the whole connection follows it. */
	__u16 proxy_port;
};

/*
 * The L7 redirect (mirrored by crates/abi/src/proxy.rs). skb->mark of a
 * packet handed to the proxy's listener with bpf_sk_assign: the agent's ip
 * rule "fwmark SINEW_MARK_TO_PROXY lookup SINEW_PROXY_ROUTE_TABLE" and that
 * table's local default route deliver it on this node.
 */
#define SINEW_MARK_TO_PROXY	0x5e3e0002
#define SINEW_PROXY_ROUTE_TABLE 2004

/*
 * The SO_MARK of the proxy's upstream sockets: magic byte, then the client's
 * identity (23 bits), or with PROXY_MARK_CIDR a CIDR identity's offset from
 * SINEW_IDENTITY_MIN_CIDR. Such packets are never redirected again and are
 * judged as coming from that identity.
 */
#define PROXY_MARK_MAGIC	0x5f000000
#define PROXY_MARK_MAGIC_MASK	0xff000000
#define PROXY_MARK_CIDR		(1U << 23)
#define PROXY_MARK_ID_MASK	(PROXY_MARK_CIDR - 1)
#define SINEW_IDENTITY_MIN_CIDR 0x01000000

/* nat: LRU hash, both directions of every masqueraded flow. */
struct nat_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport; /* ICMP echo: identifier in sport (out) or dport (in) */
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct nat_value {
	__u32 addr; /* rewrite to this address... */
	__u16 port; /* ...and this port (ICMP: identifier) */
	__u16 pad;
	__u64 created_ns;
};

/* metrics: per-CPU array, index = reason * 2 + direction. Reason 0 is
 * "forwarded". */
#define METRIC_DIR_INGRESS  0 /* into the pod / node */
#define METRIC_DIR_EGRESS   1 /* out of the pod / node */
#define METRICS_MAX_ENTRIES 512

struct metrics_value {
	__u64 packets;
	__u64 bytes;
};

/*
 * Flow events, on one ring buffer (sinew_events). Drops always produce an
 * event; forwarded packets are counted per flow (struct flow_agg) and
 * reported with the packets and bytes since the last report: at a new
 * flow, a TCP SYN, FIN or RST, once per EVENT_REPORT_INTERVAL while
 * packets come, and by the agent's flush when they stop; every packet is
 * in exactly one report. Policy verdicts once per new connection. An
 * event that does not fit in the ring is counted in
 * sinew_events_lost[type].
 */
#define EVENT_TRACE    1 /* forwarded */
#define EVENT_DROP     2 /* dropped, with a reason */
#define EVENT_POLICY   3 /* a policy decision on a new connection */
#define EVENT_TYPE_MAX 4

/* Where a traced packet went (flow_event.obs for EVENT_TRACE). */
#define TRACE_TO_STACK	  1
#define TRACE_TO_ENDPOINT 2
#define TRACE_TO_TUNNEL	  3
#define TRACE_TO_PROXY	  4 /* reserved for the L7 proxy */
#define TRACE_TO_NETWORK  5

/* Which program saw it (flow_event.hook). */
#define HOOK_FROM_CONTAINER 1
#define HOOK_TO_CONTAINER   2
#define HOOK_FROM_NETDEV    3
#define HOOK_TO_NETDEV	    4
#define HOOK_FROM_OVERLAY   5
#define HOOK_TO_OVERLAY	    6

/* flow_event.match for EVENT_POLICY: what kind of entry decided. */
#define MATCH_NONE    0 /* no entry: isolated, default deny */
#define MATCH_L3_ONLY 1 /* this identity, any port */
#define MATCH_L3_L4   2 /* this identity and port/protocol */
#define MATCH_L4_ONLY 3 /* any identity, this port/protocol */
#define MATCH_ALL     4 /* any identity, any port */

#define VERDICT_FORWARDED 1
#define VERDICT_DROPPED	  2

struct flow_event {
	__u64 ts_ns; /* bpf_ktime_get_ns */
	__u32 saddr; /* network order */
	__u32 daddr;
	__u16 sport; /* network order */
	__u16 dport;
	__u8 proto;
	__u8 type;   /* EVENT_* */
	__u8 reason; /* drop reason (EVENT_DROP, EVENT_POLICY denied) */
	__u8 dir;    /* METRIC_DIR_* */
	__u32 ifindex;
	__u32 ep_id;	     /* the local endpoint involved, 0 if none */
	__u32 peer_identity; /* policy: the remote identity */
	__u32 rule_id;	     /* policy: the deciding rule, 0 if none */
	__u32 len;	     /* packet length */
	__u8 hook;	     /* HOOK_* */
	__u8 obs;	     /* TRACE_TO_* */
	__u8 tcp_flags;
	__u8 verdict; /* VERDICT_* */
	__u8 match;   /* MATCH_* (EVENT_POLICY) */
	__u8 pad;
	__u16 icmp_id; /* ICMP echo identifier (network order), else 0 */
	__u8 pad2[4];
	__u64 packets; /* aggregated since the last event of this flow */
	__u64 bytes;
};

/*
 * Per-flow aggregation of forwarded packets, one entry per direction and
 * hook (ICMP echo: per identifier). The packets and bytes since the last
 * report live in one word, `acc`, so that taking them is one atomic
 * exchange: packets in bits 40..62, bytes in bits 0..39, bit 63 set once
 * the entry is retired (being deleted): a packet that finds it set reports
 * itself. The datapath adds with an atomic fetch-and-add and takes the
 * word when a report is due; the agent's periodic flush (flush_flows in
 * bpf_flush.c) takes what is due and retires idle entries.
 */
#define FLOW_ACC_DEAD	   (1ULL << 63)
#define FLOW_ACC_PKT_SHIFT 40
#define FLOW_ACC_BYTES	   ((1ULL << FLOW_ACC_PKT_SHIFT) - 1)
#define FLOW_ACC_PKTS(v)   (((v) & ~FLOW_ACC_DEAD) >> FLOW_ACC_PKT_SHIFT)
/* A report is taken before either field could overflow. */
#define FLOW_ACC_PKTS_MAX  (1ULL << 21)
#define FLOW_ACC_BYTES_MAX (1ULL << 38)

#define FLOW_OPEN    0
#define FLOW_CLOSING 1 /* TCP FIN or RST seen: the last ACKs follow */

/*
 * Set in flush_flows' return value (beside the number of reports it wrote)
 * when it stopped with entries left because half of the event ring was
 * waiting: the agent drains the ring and runs it again.
 */
#define FLUSH_MORE (1U << 31)

struct flow_agg_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 hook;
	__u16 icmp_id; /* ICMP echo identifier (network order), else 0 */
};

struct flow_agg {
	__u64 acc;
	__u64 last_seen_ns;   /* coarse clock, last packet */
	__u64 last_report_ns; /* coarse clock, last report */
	/* For the agent's flush reports: what the first packet's event said. */
	__u32 ifindex;
	__u32 ep_id;
	__u32 peer_identity;
	__u8 dir;
	__u8 obs;
	__u8 state; /* FLOW_* */
	__u8 pad;
};

/*
 * Services. A frontend {vip, port, proto, scope} names a service; its
 * backends that take new connections sit in slots 1..count (random
 * selection) and in a Maglev table of CFG_MAGLEV_TABLE_SIZE entries
 * (consistent hashing). Backend ids belong to one frontend, so a
 * backend's flags say whether that service may still pick it. The socket
 * hooks (bpf_sock.c) translate at connect/sendmsg time and remember the
 * service address per socket cookie for recvmsg/getpeername.
 */
#define LB_SCOPE_INTERNAL 0 /* sockets inside the cluster (bpf_sock.c) */
#define LB_SCOPE_EXTERNAL 1 /* packets from outside (NodePort; not built) */

#define LB_F_AFFINITY	(1U << 0) /* sessionAffinity ClientIP */
#define LB_F_MAGLEV	(1U << 1) /* Maglev instead of random */
#define LB_F_LOCAL_ONLY (1U << 2) /* traffic policy Local */

struct lb_svc_key {
	__u32 vip;  /* network order */
	__u16 port; /* network order */
	__u8 proto;
	__u8 scope; /* LB_SCOPE_* */
};

struct lb_svc_value {
	__u32 svc_id;		/* also the reverse-NAT id */
	__u16 count;		/* backends in slots 1..count; 0 refuses */
	__u16 flags;		/* LB_F_* */
	__u32 affinity_timeout; /* seconds */
	__u32 pad;
};

struct lb_slot_key {
	__u32 svc_id;
	__u32 slot; /* 1..count */
};

#define LB_BE_F_ACTIVE	    (1U << 0) /* its service may pick it */
#define LB_BE_F_TERMINATING (1U << 1) /* for display; drained by the agent */

struct lb_backend {
	__u32 addr; /* network order */
	__u16 port; /* network order */
	__u8 proto;
	__u8 flags; /* LB_BE_F_* */
	__u32 svc_id;
	__u32 pad;
};

struct lb_maglev_key {
	__u32 svc_id;
	__u32 index; /* 0..CFG_MAGLEV_TABLE_SIZE-1 */
};

/* sessionAffinity: the client is its network namespace (a pod, or the
 * node's own processes). */
struct lb_affinity_key {
	__u64 netns_cookie;
	__u32 svc_id;
	__u32 pad;
};

struct lb_affinity_value {
	__u64 last_used_ns;
	__u32 backend_id;
	__u32 pad;
};

/* What a socket connected or sent to: keyed by its cookie and the backend
 * it really talks to, so replies and getpeername show the service. */
struct lb_revnat_key {
	__u64 cookie;
	__u32 addr; /* backend, network order */
	__u16 port; /* network order */
	__u16 pad;
};

struct lb_revnat_value {
	__u32 vip;  /* network order */
	__u16 port; /* network order */
	__u16 pad;
};

/*
 * lb_nat (LRU, key struct nat_key as the packet arrives): node port flows
 * whose backend is on another node (externalTrafficPolicy Cluster). Both
 * directions; each rewrites destination and source, then goes to the
 * backend (forward) or back out to the client (reply).
 */
#define LB_NAT_TO_BACKEND 1
#define LB_NAT_TO_CLIENT  2

struct lb_nat_entry {
	__u32 daddr; /* new destination, network order */
	__u32 saddr; /* new source */
	__u16 dport; /* network order */
	__u16 sport;
	__u8 dir; /* LB_NAT_TO_* */
	__u8 pad[3];
	__u64 created_ns;
};

/* Routing modes, load-time constant CFG_ROUTING_MODE. */
#define ROUTING_NATIVE 0
#define ROUTING_VXLAN  1

/* The UDP port of the agent's VXLAN device. */
#define SINEW_VXLAN_PORT 8472

/* The reqid of every XFRM state and policy template the agent makes
 * (IPsec): what marks a state as Sinew's, on receive too. */
#define SINEW_IPSEC_REQID 0x51534e57

#endif
