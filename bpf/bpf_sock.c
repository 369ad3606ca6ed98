// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Socket-level service load balancing on cgroup v2 hooks. A TCP connect or
 * UDP send to a service address is sent straight to a backend, once, at
 * connect/send time: no packet of the flow is translated afterwards.
 * recvmsg and getpeername show the service address again, so applications
 * never see the backend. A service without usable backends refuses at
 * once with ECONNREFUSED.
 */
#include "lib/common.h"
#include "lib/lb.h"

#define SYS_REJECT  0
#define SYS_PROCEED 1

#ifndef ECONNREFUSED
#define ECONNREFUSED 111
#endif

/* The flow's hash for Maglev: the client's bound address and port when it
 * has them (so a client that binds gets the same backend on every node),
 * else the socket cookie. */
static __always_inline __u32 sock4_hash(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	__u32 src_ip = 0, src_port = 0;

	if (sk) {
		src_ip = sk->src_ip4;
		src_port = sk->src_port;
	}
	if (!src_port)
		src_port = (__u32)bpf_get_socket_cookie(ctx);
	return lb_hash(src_ip, src_port, ctx->user_ip4,
		       ctx->user_port | (ctx->protocol << 16));
}

/* The backend for a new flow, honouring session affinity. */
static __always_inline struct lb_backend *
sock4_pick(struct bpf_sock_addr *ctx, const struct lb_svc_value *svc)
{
	struct lb_affinity_key ak = {};
	struct lb_affinity_value av = {};
	struct lb_affinity_value *cur;
	struct lb_backend *be;
	__u64 now = 0;
	__u32 id;

	if (svc->flags & LB_F_AFFINITY) {
		ak.netns_cookie = bpf_get_netns_cookie(ctx);
		ak.svc_id = svc->svc_id;
		now = bpf_ktime_get_ns();
		cur = bpf_map_lookup_elem(&sinew_lb_affinity, &ak);
		if (cur && now - cur->last_used_ns <=
			       (__u64)svc->affinity_timeout * 1000000000ULL) {
			be = lb_backend_usable(cur->backend_id, svc->svc_id);
			if (be) {
				cur->last_used_ns = now;
				return be;
			}
		}
	}
	id = lb_select(svc, sock4_hash(ctx));
	if (!id)
		return 0;
	be = lb_backend_usable(id, svc->svc_id);
	if (be && (svc->flags & LB_F_AFFINITY)) {
		av.last_used_ns = now;
		av.backend_id = id;
		bpf_map_update_elem(&sinew_lb_affinity, &ak, &av, BPF_ANY);
	}
	return be;
}

static __always_inline int sock4_forward(struct bpf_sock_addr *ctx)
{
	struct lb_svc_key key = {};
	struct lb_revnat_key rk = {};
	struct lb_revnat_value rv = {};
	struct lb_svc_value *svc;
	struct lb_backend *be = 0;

	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
		return SYS_PROCEED;
	key.vip = ctx->user_ip4;
	key.port = (__u16)ctx->user_port;
	key.proto = (__u8)ctx->protocol;
	key.scope = LB_SCOPE_INTERNAL;
	svc = bpf_map_lookup_elem(&sinew_lb_services, &key);
	if (!svc)
		return SYS_PROCEED;
	if (svc->count)
		be = sock4_pick(ctx, svc);
	if (!be) {
		lb_count_refused();
		bpf_set_retval(-ECONNREFUSED);
		return SYS_REJECT;
	}
	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.addr = be->addr;
	rk.port = be->port;
	rv.vip = key.vip;
	rv.port = key.port;
	bpf_map_update_elem(&sinew_lb_revnat, &rk, &rv, BPF_ANY);
	ctx->user_ip4 = be->addr;
	ctx->user_port = be->port;
	return SYS_PROCEED;
}

/* Shows the service address where the socket really talks to a backend. */
static __always_inline int sock4_reverse(struct bpf_sock_addr *ctx)
{
	struct lb_revnat_key rk = {};
	struct lb_revnat_value *rv;

	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.addr = ctx->user_ip4;
	rk.port = (__u16)ctx->user_port;
	rv = bpf_map_lookup_elem(&sinew_lb_revnat, &rk);
	if (rv) {
		ctx->user_ip4 = rv->vip;
		ctx->user_port = rv->port;
	}
	return SYS_PROCEED;
}

SEC("cgroup/connect4")
int sock_connect4(struct bpf_sock_addr *ctx)
{
	return sock4_forward(ctx);
}

SEC("cgroup/sendmsg4")
int sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_forward(ctx);
}

SEC("cgroup/recvmsg4")
int sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_reverse(ctx);
}

SEC("cgroup/getpeername4")
int sock_getpeername4(struct bpf_sock_addr *ctx)
{
	return sock4_reverse(ctx);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
