/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Every drop has one of these reasons. Mirrored by sinew_abi::DropReason;
 * a test keeps the two lists equal. Functions return the negated code.
 */
#ifndef SINEW_DROP_REASONS_H
#define SINEW_DROP_REASONS_H

/* clang-format off */
#define REASON_FORWARDED	0
#define DROP_INVALID_PACKET	1
#define DROP_UNSUPPORTED_L3	2
#define DROP_UNKNOWN_ENDPOINT	3
#define DROP_SPOOFED_SOURCE	4
#define DROP_TTL_EXCEEDED	5
#define DROP_REDIRECT_FAILED	6
#define DROP_TUNNEL_KEY		7
#define DROP_NAT_NO_PORT	8
#define DROP_CSUM_FAILED	9
#define DROP_ARP_INVALID	10
#define DROP_UNSUPPORTED_L4	11
#define DROP_NO_TUNNEL_ENDPOINT 12
#define DROP_FRAGMENT		13
#define DROP_IP_OPTIONS		14
#define DROP_POLICY		15 /* no rule allows it; the endpoint is isolated */
#define DROP_POLICY_DENY	16 /* a deny rule matched */
#define DROP_CT_FULL		17 /* conntrack table full (fail closed) */
#define DROP_POLICY_NOT_READY	18 /* endpoint's policy not installed */
#define DROP_NO_SERVICE_BACKEND 19 /* no usable backend: refused */
#define DROP_ENCAP_FAILED	20 /* a tunnel header not added or removed */
#define DROP_NO_LOCAL_BACKEND	21 /* Local policy, none here: times out */
#define DROP_PROXY_UNAVAILABLE	22 /* L7 rule, no proxy listener: closed */
#define DROP_NO_ENCRYPTION_KEY	23 /* encryption on, peer key unknown */
#define DROP_UNENCRYPTED_FROM_PEER 24 /* encryption on, clear from a node */
#define DROP_REASON_MAX		25
/* clang-format on */

#endif
