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

#define SINEW_ABI_VERSION 2

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
	__u16 proxy_port; /* L7 redirect, 0 = none */
	__u8 action;
	__u8 pad;
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
	__u8 pad[3];
};

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

/* Routing modes, load-time constant CFG_ROUTING_MODE. */
#define ROUTING_NATIVE 0
#define ROUTING_VXLAN  1

#endif
