/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Incremental Internet checksum updates (RFC 1624). */
#ifndef FO_CSUM_H
#define FO_CSUM_H

#include <linux/types.h>
#include <stdbool.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

static __always_inline __u16 csum_fold32(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

/* HC' = ~(~HC + m'- m), with (m' - m) given as a folded diff. */
static __always_inline __u16 csum_apply(__u16 check, __u32 diff)
{
	return (__u16)~csum_fold32((__u32)(__u16)~check + diff);
}

/* Diff of decrementing the TTL by one: the TTL is the first byte of the
 * {ttl, protocol} word, so the word drops by 0x0100 in network order
 * (ip_decrease_ttl in include/net/ip.h adds htons(0x0100) to the checksum).
 */
static __always_inline __u32 csum_ttl_dec_diff(void)
{
	return (__u16)~bpf_htons(0x0100);
}

/* Diff of decrementing the IPv6 hop limit by one: the second byte of the
 * {next header, hop limit} word, so the word drops by one in network order.
 * No header checksum absorbs it: a CHECKSUM_COMPLETE skb->csum must take it
 * (ip6_forward makes such an skb CHECKSUM_NONE instead, skb_forward_csum).
 */
static __always_inline __u32 csum_hl_dec_diff(void)
{
	return (__u16)~bpf_htons(0x0001);
}

#endif
