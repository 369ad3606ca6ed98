// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Socket-level service load balancing on cgroup v2 hooks. A TCP connect or
 * UDP send to a service address is sent straight to a backend, once, at
 * connect/send time: no packet of the flow is translated afterwards.
 * recvmsg and getpeername show the service address again, so applications
 * never see the backend. A service without usable backends refuses at
 * once with ECONNREFUSED. IPv6 sockets get the same for IPv4-mapped
 * service addresses.
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
static __always_inline __u32 sock_hash(struct bpf_sock_addr *ctx, __u32 vip,
				       __u16 port)
{
	struct bpf_sock *sk = ctx->sk;
	__u32 src_ip = 0, src_port = 0;

	if (sk) {
		src_ip = sk->src_ip4;
		src_port = sk->src_port;
	}
	if (!src_port)
		src_port = (__u32)bpf_get_socket_cookie(ctx);
	return lb_hash(src_ip, src_port, vip, port | (ctx->protocol << 16));
}

/* The backend for a new flow, honouring session affinity. */
static __always_inline struct lb_backend *
sock_pick(struct bpf_sock_addr *ctx, const struct lb_svc_value *svc, __u32 vip,
	  __u16 port)
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
	id = lb_select(svc, sock_hash(ctx, vip, port));
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

/*
 * Picks the backend for a connect or send to vip:port (network order).
 * Returns 1 with *be set for a service, 0 when it is not one, -1 when the
 * service has no usable backend (refused, counted).
 */
static __always_inline int sock_lb(struct bpf_sock_addr *ctx, __u32 vip,
				   __u16 port, struct lb_backend *be)
{
	struct lb_svc_key key = {};
	struct lb_revnat_key rk = {};
	struct lb_revnat_value rv = {};
	struct lb_svc_value *svc;
	struct lb_backend *pick = 0;

	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
		return 0;
	key.vip = vip;
	key.port = port;
	key.proto = (__u8)ctx->protocol;
	key.scope = LB_SCOPE_INTERNAL;
	svc = bpf_map_lookup_elem(&sinew_lb_services, &key);
	if (!svc)
		return 0;
	if (svc->count)
		pick = sock_pick(ctx, svc, vip, port);
	if (!pick) {
		lb_count_refused();
		bpf_set_retval(-ECONNREFUSED);
		return -1;
	}
	*be = *pick;
	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.addr = be->addr;
	rk.port = be->port;
	rv.vip = vip;
	rv.port = port;
	bpf_map_update_elem(&sinew_lb_revnat, &rk, &rv, BPF_ANY);
	return 1;
}

/* The service address a socket really talking to addr:port connected or
 * sent to, or NULL. */
static __always_inline struct lb_revnat_value *
sock_revnat(struct bpf_sock_addr *ctx, __u32 addr, __u16 port)
{
	struct lb_revnat_key rk = {};

	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.addr = addr;
	rk.port = port;
	return bpf_map_lookup_elem(&sinew_lb_revnat, &rk);
}

static __always_inline int sock4_forward(struct bpf_sock_addr *ctx)
{
	struct lb_backend be;
	int r = sock_lb(ctx, ctx->user_ip4, (__u16)ctx->user_port, &be);

	if (r < 0)
		return SYS_REJECT;
	if (r > 0) {
		ctx->user_ip4 = be.addr;
		ctx->user_port = be.port;
	}
	return SYS_PROCEED;
}

/* Shows the service address where the socket really talks to a backend. */
static __always_inline int sock4_reverse(struct bpf_sock_addr *ctx)
{
	struct lb_revnat_value *rv =
	    sock_revnat(ctx, ctx->user_ip4, (__u16)ctx->user_port);

	if (rv) {
		ctx->user_ip4 = rv->vip;
		ctx->user_port = rv->port;
	}
	return SYS_PROCEED;
}

/*
 * IPv6 sockets reach IPv4 services through IPv4-mapped addresses
 * (::ffff:a.b.c.d): dual-stack sockets, the default of some runtimes.
 */
static __always_inline int sock6_mapped_v4(struct bpf_sock_addr *ctx, __u32 *v4)
{
	if (ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0 ||
	    ctx->user_ip6[2] != bpf_htonl(0xffff))
		return 0;
	*v4 = ctx->user_ip6[3];
	return 1;
}

static __always_inline int sock6_forward(struct bpf_sock_addr *ctx)
{
	struct lb_backend be;
	__u32 v4;
	int r;

	if (!sock6_mapped_v4(ctx, &v4))
		return SYS_PROCEED;
	r = sock_lb(ctx, v4, (__u16)ctx->user_port, &be);
	if (r < 0)
		return SYS_REJECT;
	if (r > 0) {
		ctx->user_ip6[3] = be.addr;
		ctx->user_port = be.port;
	}
	return SYS_PROCEED;
}

static __always_inline int sock6_reverse(struct bpf_sock_addr *ctx)
{
	struct lb_revnat_value *rv;
	__u32 v4;

	if (!sock6_mapped_v4(ctx, &v4))
		return SYS_PROCEED;
	rv = sock_revnat(ctx, v4, (__u16)ctx->user_port);
	if (rv) {
		ctx->user_ip6[3] = rv->vip;
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

SEC("cgroup/connect6")
int sock_connect6(struct bpf_sock_addr *ctx)
{
	return sock6_forward(ctx);
}

SEC("cgroup/sendmsg6")
int sock_sendmsg6(struct bpf_sock_addr *ctx)
{
	return sock6_forward(ctx);
}

SEC("cgroup/recvmsg6")
int sock_recvmsg6(struct bpf_sock_addr *ctx)
{
	return sock6_reverse(ctx);
}

SEC("cgroup/getpeername6")
int sock_getpeername6(struct bpf_sock_addr *ctx)
{
	return sock6_reverse(ctx);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
