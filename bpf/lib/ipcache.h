/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Address -> identity, tunnel endpoint, local endpoint. */
#ifndef SINEW_IPCACHE_H
#define SINEW_IPCACHE_H

#include "maps.h"

static __always_inline struct ipcache_value *ipcache_lookup4(__u32 addr)
{
	struct ipcache_key key = {};

	key.prefixlen = 32 + 32;
	key.family = SINEW_FAMILY_V4;
	key.addr[0] = addr;
	return bpf_map_lookup_elem(&sinew_ipcache, &key);
}

#endif
