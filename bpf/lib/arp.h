/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * A pod has a /32 and a default route to an on-link gateway. Every ARP
 * request it sends (for the gateway, or anything else: all its traffic goes
 * through the node) is answered with the host-side veth's MAC, in place.
 */
#ifndef SINEW_ARP_H
#define SINEW_ARP_H

#include "common.h"

struct arp_eth_ipv4 {
	__u8 sha[ETH_ALEN];
	__u32 sip;
	__u8 tha[ETH_ALEN];
	__u32 tip;
} __attribute__((packed));

#define ARP_OFF	     ((int)sizeof(struct ethhdr))
#define ARP_BODY_OFF (ARP_OFF + (int)sizeof(struct arphdr))

static __always_inline int arp_respond(struct __sk_buff *skb,
				       const struct endpoint_info *ep)
{
	struct arphdr *arp = PKT_PTR(skb, ARP_OFF, struct arphdr);
	struct arp_eth_ipv4 *body =
	    PKT_PTR(skb, ARP_BODY_OFF, struct arp_eth_ipv4);
	struct arp_eth_ipv4 reply;
	__be16 op = bpf_htons(ARPOP_REPLY);

	if (!arp || !body)
		return -DROP_INVALID_PACKET;
	if (arp->ar_hrd != bpf_htons(ARPHRD_ETHER) ||
	    arp->ar_pro != bpf_htons(ETH_P_IP) || arp->ar_hln != ETH_ALEN ||
	    arp->ar_pln != 4)
		return -DROP_ARP_INVALID;
	/* Replies (to the node resolving the pod) go up the stack. */
	if (arp->ar_op != bpf_htons(ARPOP_REQUEST))
		return TC_ACT_OK;
	/* Gratuitous ARP and the pod probing its own address get no answer. */
	if (body->tip == body->sip || body->tip == ep->ipv4)
		return -DROP_ARP_INVALID;

	__builtin_memcpy(reply.sha, ep->host_mac, ETH_ALEN);
	reply.sip = body->tip;
	__builtin_memcpy(reply.tha, body->sha, ETH_ALEN);
	reply.tip = body->sip;

	if (eth_rewrite(skb, reply.tha, ep->host_mac) < 0)
		return -DROP_INVALID_PACKET;
	if (bpf_skb_store_bytes(skb, ARP_OFF + offsetof(struct arphdr, ar_op),
				&op, sizeof(op), 0) < 0)
		return -DROP_INVALID_PACKET;
	if (bpf_skb_store_bytes(skb, ARP_BODY_OFF, &reply, sizeof(reply), 0) <
	    0)
		return -DROP_INVALID_PACKET;
	return bpf_redirect(skb->ifindex, 0);
}

#endif
