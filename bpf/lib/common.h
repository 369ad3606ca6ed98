/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Includes, node-wide load-time configuration and small packet helpers. */
#ifndef SINEW_COMMON_H
#define SINEW_COMMON_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/if_arp.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/icmp.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "../include/sinew_abi.h"
#include "drop_reasons.h"

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

/*
 * Node-wide settings: set once when the agent loads the object
 * (EbpfLoader::override_global with must_exist). Never per pod.
 */
volatile const __u32 CFG_NODE_IP = 0; /* network order */
volatile const __u32 CFG_ROUTING_MODE = ROUTING_NATIVE;
volatile const __u32 CFG_VXLAN_IFINDEX = 0;
/* The uplink: native routing sends pod traffic for other nodes straight
 * to it. 0 leaves that traffic to the stack. */
volatile const __u32 CFG_UPLINK_IFINDEX = 0;
volatile const __u32 CFG_ENABLE_MASQ = 1;
volatile const __u32 CFG_NAT_PORT_MIN = 61000;
volatile const __u32 CFG_NAT_PORT_MAX = 65535;
/* A full conntrack table: 0 drops new connections (fail closed), 1 lets
 * them through untracked. Both count DROP_CT_FULL. */
volatile const __u32 CFG_CT_FAIL_OPEN = 0;
/* Flow events on (1) or off (0), and how often a flow without TCP state
 * reports its counters. */
volatile const __u32 CFG_EVENTS_ENABLED = 1;
volatile const __u64 CFG_EVENT_REPORT_INTERVAL_NS = 5000000000ULL;
/* Entries of each service's Maglev table (a prime). */
volatile const __u32 CFG_MAGLEV_TABLE_SIZE = 16381;
/* Encryption between nodes (lib/encrypt.h). */
/* The WireGuard device's ifindex; 0: encryption off. */
volatile const __u32 CFG_ENCRYPT_IFINDEX = 0;
/* 1: the node's own traffic to other nodes is encrypted too (always:
 * VXLAN, which carries pods' traffic). */
volatile const __u32 CFG_ENCRYPT_NODE = 0;
/* WireGuard's UDP port: its own packets go on the underlay. */
volatile const __u32 CFG_WIREGUARD_PORT = 51871;
/* 1: IPsec (ESP by the kernel's XFRM policies, which the stack applies):
 * what leaves for another node goes through the stack, never straight to
 * the uplink, and nothing for another node leaves the uplink but ESP. */
volatile const __u32 CFG_ENCRYPT_IPSEC = 0;

/*
 * A program's result for a packet it encapsulated in VXLAN and redirected:
 * TC_ACT_REDIRECT to the kernel, but the events and metrics of finish()
 * describe the inner packet, VXLAN_ENCAP_LEN bytes further in.
 */
#define RET_ENCAPSULATED 0x100

/*
 * skb->mark of a pod packet that from_container routed to another node
 * itself (native routing): to_netdev lets it go without lookups and clears
 * the mark. A pod cannot forge it: crossing from the pod's namespace
 * clears every mark.
 */
#define SINEW_MARK_ROUTED 0x5e3e0001
#define VXLAN_ENCAP_LEN	  50 /* outer IPv4 + UDP + VXLAN + inner Ethernet */

/*
 * A 32-bit field of the context, loaded from the context pointer itself:
 * clang may otherwise keep &skb->data as a derived pointer across calls,
 * which the verifier refuses ("dereference of modified ctx ptr").
 */
#define SKB_LOAD32(skb, field)                                                 \
	({                                                                     \
		__u64 __v; /* the load zero-extends: no shifts */              \
		asm volatile("%0 = *(u32 *)(%1 + %2)"                          \
			     : "=r"(__v)                                       \
			     : "r"(skb), "i"(__builtin_offsetof(               \
					     struct __sk_buff, field)));       \
		__v;                                                           \
	})

/* Bounds-checked pointers into the linear packet data. */
#define PKT_PTR(skb, off, type)                                                \
	({                                                                     \
		void *__d = (void *)(long)SKB_LOAD32(skb, data);               \
		void *__e = (void *)(long)SKB_LOAD32(skb, data_end);           \
		type *__p = __d + (off);                                       \
		((void *)(__p + 1) > __e) ? (type *)0 : __p;                   \
	})

#define ETH_OFF 0
#define IP_OFF	((int)sizeof(struct ethhdr))

static __always_inline int ipv4_is_fragment(const struct iphdr *ip)
{
	return ip->frag_off & bpf_htons(0x3fff); /* MF or offset */
}

/* Rewrites both MACs of the frame at the start of skb (in place: no helper
 * call; dst and src must not point into the packet). */
static __always_inline int eth_rewrite(struct __sk_buff *skb, const __u8 *dst,
				       const __u8 *src)
{
	struct ethhdr *eth = PKT_PTR(skb, ETH_OFF, struct ethhdr);

	if (!eth)
		return -DROP_INVALID_PACKET;
	__builtin_memcpy(eth->h_dest, dst, ETH_ALEN);
	__builtin_memcpy(eth->h_source, src, ETH_ALEN);
	return 0;
}

/*
 * Decrements the TTL as a router would; the caller drops on error. The
 * header checksum is updated in place: the TTL is the high byte of its
 * 16-bit word, so the one's complement sum gains 0x0100 (RFC 1624).
 */
static __always_inline int ipv4_dec_ttl(struct __sk_buff *skb)
{
	struct iphdr *ip = PKT_PTR(skb, IP_OFF, struct iphdr);
	__u32 sum;

	if (!ip)
		return -DROP_INVALID_PACKET;
	if (ip->ttl <= 1)
		return -DROP_TTL_EXCEEDED;
	ip->ttl--;
	sum = (__u32)ip->check + bpf_htons(0x0100);
	ip->check = (__u16)(sum + (sum >> 16));
	return 0;
}

#endif
