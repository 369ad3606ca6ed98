/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Address -> identity, tunnel endpoint, local endpoint. */
#ifndef SINEW_IPCACHE_H
#define SINEW_IPCACHE_H

#include "maps.h"

/* Addresses inside the cluster (pods and nodes). CIDR identities that
 * policies name are in the ipcache too, with no flags: outside. */
#define IPCACHE_F_IN_CLUSTER                                                   \
	(IPCACHE_F_LOCAL_EP | IPCACHE_F_NODE | IPCACHE_F_POD_CIDR |            \
	 IPCACHE_F_REMOTE_EP)

static __always_inline struct ipcache_value *ipcache_lookup4(__u32 addr)
{
	struct ipcache_key key = {};

	key.prefixlen = 32 + 32;
	key.family = SINEW_FAMILY_V4;
	key.addr[0] = addr;
	return bpf_map_lookup_elem(&sinew_ipcache, &key);
}

#endif
