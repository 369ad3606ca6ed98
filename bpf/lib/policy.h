/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Identity-based L3/L4 policy for one endpoint and direction: conntrack
 * first, then two LPM lookups (the peer's identity, and "any peer"), and
 * for endpoints with CIDR rules two more (the peer address's CIDR class,
 * and the policy entry of that class), deny winning. Costs the same
 * whatever the number of rules.
 */
#ifndef SINEW_POLICY_H
#define SINEW_POLICY_H

#include "maps.h"
#include "conntrack.h"
#include "events.h"

/* The CIDR class of a v4 address (see sinew_abi.h), 0 when no prefix a
 * policy names holds it. */
static __always_inline __u32 cidr_class4(__u32 addr)
{
	struct ipcache_key key = {};
	__u32 *class;

	key.prefixlen = 32 + 32;
	key.family = SINEW_FAMILY_V4;
	key.addr[0] = addr;
	class = bpf_map_lookup_elem(&sinew_cidr_class, &key);
	return class ? *class : 0;
}

/* The peer address's class, looked up only for endpoints whose policy has
 * CIDR rules in this direction; others pay nothing. */
static __always_inline __u32 peer_cidr_class(const struct endpoint_info *ep,
					     __u8 dir, const struct iphdr *ip)
{
	if (dir == POLICY_DIR_INGRESS)
		return (ep->flags & EP_F_CIDR_INGRESS) ? cidr_class4(ip->saddr)
						       : 0;
	return (ep->flags & EP_F_CIDR_EGRESS) ? cidr_class4(ip->daddr) : 0;
}

static __always_inline int policy_verdict(struct policy_value *v,
					  __u32 *rule_id, __u8 *match,
					  __u16 *proxy_port)
{
	*rule_id = v->rule_id;
	*match = v->match;
	if (v->action == POLICY_ACTION_DENY)
		return -DROP_POLICY_DENY;
	*proxy_port = v->proxy_port;
	return 0;
}

static __always_inline int policy_lookup(__u32 ep_id, __u32 identity,
					 __u32 cidr_class, __u8 dir, __u8 proto,
					 __u16 dport, __u32 *rule_id,
					 __u8 *match, __u16 *proxy_port)
{
	struct policy_value *by_id, *by_class = NULL, *any;
	struct policy_key k = {};

	k.prefixlen = POLICY_PREFIX_FULL;
	k.ep_id = ep_id;
	k.identity = identity;
	k.direction = dir;
	k.proto = proto;
	k.dport = dport;
	by_id = bpf_map_lookup_elem(&sinew_policy, &k);
	if (cidr_class) {
		k.identity = cidr_class | POLICY_CIDR_CLASS;
		by_class = bpf_map_lookup_elem(&sinew_policy, &k);
	}
	k.identity = POLICY_ANY_IDENTITY;
	any = bpf_map_lookup_elem(&sinew_policy, &k);

	if (by_id && by_id->action == POLICY_ACTION_DENY)
		return policy_verdict(by_id, rule_id, match, proxy_port);
	if (by_class && by_class->action == POLICY_ACTION_DENY)
		return policy_verdict(by_class, rule_id, match, proxy_port);
	if (any && any->action == POLICY_ACTION_DENY)
		return policy_verdict(any, rule_id, match, proxy_port);
	if (by_id)
		return policy_verdict(by_id, rule_id, match, proxy_port);
	if (by_class)
		return policy_verdict(by_class, rule_id, match, proxy_port);
	if (any)
		return policy_verdict(any, rule_id, match, proxy_port);
	*match = MATCH_NONE;
	return -DROP_POLICY;
}

/*
 * Decides whether a packet may enter (POLICY_DIR_INGRESS) or leave
 * (POLICY_DIR_EGRESS) endpoint ep, whose peer has identity peer. Returns 0
 * or a negative drop reason. Endpoints no policy selects are not tracked.
 *
 * *proxy_port gets the proxy listener the packet must go to, 0 for none:
 * the entry's port when a TCP connection begins, and the port conntrack
 * remembered for it from then on, so that the whole connection goes to the
 * proxy or none of it does. A NULL proxy_port says the caller cannot
 * redirect (the proxy's own upstream packets): such connections are
 * tracked without one.
 */
static __always_inline int policy_enforce(struct __sk_buff *skb,
					  const struct endpoint_info *ep,
					  __u8 dir, __u32 peer,
					  __u16 *proxy_port)
{
	__u32 enforced = dir == POLICY_DIR_INGRESS ? EP_F_INGRESS_ENFORCED
						   : EP_F_EGRESS_ENFORCED;
	struct ct_key key = {}, rev = {};
	struct ct_entry *e, entry = {};
	struct iphdr *ip;
	__u32 rule_id = 0;
	__u8 match = MATCH_NONE;
	__u16 port = 0;
	__u8 tcp_flags;
	__u64 now;
	int ret;

	if (proxy_port)
		*proxy_port = 0;
	if (ep->flags & EP_F_POLICY_NOT_READY) {
		note_policy(ep->id, peer, 0);
		return -DROP_POLICY_NOT_READY;
	}
	if (!(ep->flags & (EP_F_INGRESS_ENFORCED | EP_F_EGRESS_ENFORCED)))
		return 0;
	ip = PKT_PTR(skb, IP_OFF, struct iphdr);
	if (!ip)
		return -DROP_INVALID_PACKET;
	ret = ct_tuple4(skb, ip, &key, &tcp_flags);
	if (ret < 0)
		return ret;
	key.direction = dir;
	now = bpf_ktime_get_ns();

	e = bpf_map_lookup_elem(&sinew_ct, &key);
	if (e) {
		if (e->policy_rev != ep->policy_rev && (ep->flags & enforced)) {
			/* Policy changed since the connection began: it lives
			 * on only if the new policy still allows it. */
			ret = policy_lookup(
			    ep->id, peer, peer_cidr_class(ep, dir, ip), dir,
			    key.proto, ct_policy_port(&key, skb, ip), &rule_id,
			    &match, &port);
			if (ret < 0) {
				note_policy(ep->id, peer, rule_id);
				event_policy(skb, ep->id, dir, peer, ret,
					     rule_id, match);
				bpf_map_delete_elem(&sinew_ct, &key);
				return ret;
			}
			e->rule_id = rule_id;
		}
		e->policy_rev = ep->policy_rev;
		ct_touch(e, tcp_flags, now);
		/* Mid-connection the proxy cannot take over, nor let go. */
		if (proxy_port)
			*proxy_port = e->proxy_port;
		return 0;
	}
	ct_reverse(&key, &rev);
	e = bpf_map_lookup_elem(&sinew_ct, &rev);
	if (e) {
		ct_touch(e, tcp_flags, now);
		return 0;
	}

	/* The node's own health checks and probes always reach its pods. */
	if ((ep->flags & enforced) &&
	    !(dir == POLICY_DIR_INGRESS && peer == SINEW_IDENTITY_HOST)) {
		ret = policy_lookup(
		    ep->id, peer, peer_cidr_class(ep, dir, ip), dir, key.proto,
		    ct_policy_port(&key, skb, ip), &rule_id, &match, &port);
		note_policy(ep->id, peer, rule_id);
		event_policy(skb, ep->id, dir, peer, ret, rule_id, match);
		if (ret < 0)
			return ret;
	}
	entry.last_seen_ns = now;
	entry.ep_id = ep->id;
	entry.policy_rev = ep->policy_rev;
	entry.rule_id = rule_id;
	if (proxy_port && key.proto == IPPROTO_TCP) {
		entry.proxy_port = port;
		*proxy_port = port;
	}
	if (tcp_flags & (0x01 | 0x04))
		entry.flags = CT_F_CLOSING;
	if (bpf_map_update_elem(&sinew_ct, &key, &entry, BPF_NOEXIST) < 0 &&
	    !bpf_map_lookup_elem(&sinew_ct, &key)) {
		if (!CFG_CT_FAIL_OPEN)
			return -DROP_CT_FULL;
		metrics_count(skb, DROP_CT_FULL,
			      dir == POLICY_DIR_INGRESS ? METRIC_DIR_INGRESS
							: METRIC_DIR_EGRESS);
	}
	return 0;
}

#endif
