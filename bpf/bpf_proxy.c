// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The proxy's listener lookup, attached to the node's network namespace
 * (BPF_SK_LOOKUP). Redirected connections normally reach the proxy without
 * it: TC assigns their packets to the proxy's sockets (lib/proxy.h). It
 * answers the one lookup TC cannot skip: a new SYN on a tuple that still
 * has a TIME_WAIT socket of an earlier proxied connection. TC hands that
 * SYN to the TIME_WAIT socket; the kernel retires it and looks for a
 * listener on the original destination, and this program names the proxy
 * listener TC recorded in sinew_proxy_tw. Every other lookup passes
 * untouched.
 */
#include "lib/common.h"
#include "lib/maps.h"

SEC("sk_lookup")
int proxy_lookup(struct bpf_sk_lookup *ctx)
{
	struct proxy_tw_key key = {};
	struct bpf_sock *sk;
	__u32 *port;

	if (ctx->family != AF_INET || ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	key.saddr = ctx->remote_ip4;
	key.daddr = ctx->local_ip4;
	key.sport = ctx->remote_port;
	key.dport = bpf_htons((__u16)ctx->local_port);
	port = bpf_map_lookup_elem(&sinew_proxy_tw, &key);
	if (!port)
		return SK_PASS;
	sk = bpf_map_lookup_elem(&sinew_proxy_listeners, port);
	bpf_map_delete_elem(&sinew_proxy_tw, &key);
	if (!sk)
		return SK_PASS;
	/* Fails only for a socket that stopped listening: the lookup goes
	 * on and finds nothing, so the SYN is answered as without a proxy
	 * (never delivered past it: TC sent it to this node's stack). */
	bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
