/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Keepalive in the fast path: conntrack sees none of the packets the fast
 * path forwards, so the fast path does to the entry what conntrack would
 * have done on them: reset its timeout to the one of its state, and mark a
 * UDP entry replied and assured as the replies go by. Through the
 * conntrack kfuncs (net/netfilter/nf_conntrack_bpf.c: lookup since 5.18,
 * bpf_ct_change_timeout and bpf_ct_change_status since 6.0), at most once
 * per fo_ct_interval_ns per direction, so an entry expires at most that
 * much earlier than conntrack would have expired it, never later: killed,
 * the engine leaves nothing to fix up (unlike the kernel flowtable's day
 * long timeout, nf_flow_table_extend_ct_timeout).
 *
 * Only for directions the control plane flagged FO_F_CT_REFRESH (kfuncs
 * present, conntrack zone 0: the 12-byte lookup options of 6.1 cannot name
 * another zone); the others are refreshed over ctnetlink by the engine.
 */
#ifndef FO_KEEPALIVE_H
#define FO_KEEPALIVE_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#include "flow.h"
#include "maps.h"
#include "parse.h"

/* What the fast path reads of a conntrack entry (CO-RE relocated against
 * the kernel's, or nf_conntrack module's, struct nf_conn).
 */
struct nf_ct_udp {
	unsigned long stream_ts;
} __attribute__((preserve_access_index));

union nf_conntrack_proto {
	struct nf_ct_udp udp;
} __attribute__((preserve_access_index));

struct nf_conn {
	unsigned long status;
	union nf_conntrack_proto proto;
} __attribute__((preserve_access_index));

/* struct bpf_ct_opts as 6.1 knows it (NF_BPF_CT_OPTS_SZ 12); later kernels
 * take this size too.
 */
struct bpf_ct_opts___fo {
	__s32 netns_id;
	__s32 error;
	__u8 l4proto;
	__u8 dir;
	__u8 reserved[2];
};

#define FO_CT_OPTS_SZ 12
/* BPF_F_CURRENT_NETNS: the namespace of the device the packet arrived on. */
#define FO_CT_CURRENT_NETNS (-1)

/* include/uapi/linux/netfilter/nf_conntrack_common.h */
#define FO_IPS_SEEN_REPLY (1 << 1)
#define FO_IPS_ASSURED (1 << 2)

/* Weak: unresolved on a kernel without them, and fo_ct_kfuncs (false
 * there) keeps every call unreached (the verifier prunes it).
 */
extern struct nf_conn *bpf_skb_ct_lookup(struct __sk_buff *skb, struct bpf_sock_tuple *tuple, __u32 tuple__sz,
					 struct bpf_ct_opts___fo *opts, __u32 opts__sz) __ksym __weak;
extern struct nf_conn *bpf_xdp_ct_lookup(struct xdp_md *ctx, struct bpf_sock_tuple *tuple, __u32 tuple__sz,
					 struct bpf_ct_opts___fo *opts, __u32 opts__sz) __ksym __weak;
extern int bpf_ct_change_timeout(struct nf_conn *ct, __u32 timeout) __ksym __weak;
extern int bpf_ct_change_status(struct nf_conn *ct, __u32 status) __ksym __weak;
extern void bpf_ct_release(struct nf_conn *ct) __ksym __weak;

/* The kfuncs above resolved (the control plane found them in the kernel's
 * or nf_conntrack's BTF) and keepalive is the fast path's: .rodata, set
 * before load.
 */
const volatile bool fo_ct_kfuncs = false;

/* Whether the fast path reads a UDP entry's stream_ts (fo_udp_stream):
 * .rodata, off where the verifier refused it.
 */
const volatile bool fo_ct_stream_ts = false;

/* Conntrack's timeouts in this namespace, seconds (the sysctls
 * nf_conntrack_tcp_timeout_established, nf_conntrack_udp_timeout and
 * nf_conntrack_udp_timeout_stream): written by the control plane at load
 * and whenever it reads a change. 0: not known yet, no refresh.
 */
volatile __u32 fo_ct_tcp_established_s;
volatile __u32 fo_ct_udp_s;
volatile __u32 fo_ct_udp_stream_s;

/* How often a direction refreshes its entry. Conntrack resets its timer on
 * every packet; the fast path on the first packet an eighth of the shortest
 * timeout the entry can have after the last refresh (UDP: the unreplied or
 * the stream one, whichever is shorter), between 1 and 10 s. The entry so
 * expires at most that much (12.5%) before conntrack would have expired it,
 * never after, and a connection with many slow flows (one packet a second
 * each) pays a conntrack lookup every few packets, not on each.
 */
#define FO_CT_REFRESH_MIN_NS 1000000000ULL
#define FO_CT_REFRESH_MAX_NS 10000000000ULL

static __always_inline __u64 fo_ct_interval_ns(__u8 proto)
{
	__u64 t = fo_ct_udp_s < fo_ct_udp_stream_s ? fo_ct_udp_s : fo_ct_udp_stream_s;
	__u64 ns;

	if (proto == IPPROTO_TCP)
		t = fo_ct_tcp_established_s;
	ns = t * (1000000000ULL / 8);
	if (ns < FO_CT_REFRESH_MIN_NS)
		return FO_CT_REFRESH_MIN_NS;
	return ns > FO_CT_REFRESH_MAX_NS ? FO_CT_REFRESH_MAX_NS : ns;
}

/* Whether this forwarded packet's direction should refresh its entry now. */
static __always_inline bool fo_ct_due(const struct fo_flow *f, __u8 proto, __u64 now)
{
	return fo_ct_kfuncs && (f->flags & FO_F_CT_REFRESH) && now - f->ct_refresh_ns >= fo_ct_interval_ns(proto);
}

/* The tuple the packet arrived with, as conntrack hashes it (the flow key
 * is that tuple); its size for the lookup.
 */
static __always_inline __u32 fo_ct_tuple(const struct fo_parsed *p, struct bpf_sock_tuple *t)
{
	if (p->key.family == AF_INET) {
		t->ipv4.saddr = p->key.saddr[0];
		t->ipv4.daddr = p->key.daddr[0];
		t->ipv4.sport = p->key.sport;
		t->ipv4.dport = p->key.dport;
		return sizeof(t->ipv4);
	}
	__builtin_memcpy(t->ipv6.saddr, p->key.saddr, 16);
	__builtin_memcpy(t->ipv6.daddr, p->key.daddr, 16);
	t->ipv6.sport = p->key.sport;
	t->ipv6.dport = p->key.dport;
	return sizeof(t->ipv6);
}

/* A replied UDP entry is a stream once two seconds have passed since its
 * first packet (nf_conntrack_udp_packet: time_after(jiffies,
 * ct->proto.udp.stream_ts)); a kernel without stream_ts made it one at its
 * reply.
 */
static __always_inline bool fo_udp_stream(const struct nf_conn *ct)
{
	__u64 ts64 = 0;
	__u32 ts32 = 0;

	/* Read with bpf_probe_read_kernel: 6.1's verifier refuses a direct
	 * load from the union nf_conn.proto. Without the read (fo_ct_stream_ts
	 * off: the verifier refused it too, lockdown), as before stream_ts.
	 * An unsigned long: 4 bytes on 32-bit kernels.
	 */
	if (!fo_ct_stream_ts || !bpf_core_field_exists(ct->proto.udp.stream_ts))
		return true;
	if (bpf_core_field_size(ct->proto.udp.stream_ts) == 4) {
		if (bpf_core_read(&ts32, 4, &ct->proto.udp.stream_ts))
			return true;
		return (__s32)((__u32)bpf_jiffies64() - ts32) > 0;
	}
	if (bpf_core_read(&ts64, 8, &ct->proto.udp.stream_ts))
		return true;
	return (__s64)(bpf_jiffies64() - ts64) > 0;
}

/* What conntrack does to the entry on a packet of this direction, then the
 * reference is dropped. TCP: the flow is ESTABLISHED (it is offloaded only
 * then, and a FIN or RST takes it off), so the established timeout
 * (tcp_packet). UDP (nf_conntrack_in, nf_conntrack_udp_packet): a reply
 * sets IPS_SEEN_REPLY; a replied entry gets the stream timeout and ASSURED
 * once it is a stream (fo_udp_stream), the unreplied timeout before.
 */
static __always_inline void fo_ct_apply(struct nf_conn *ct, const struct fo_parsed *p, struct fo_flow *f, __u64 now)
{
	__u32 status = ct->status;
	__u32 t;

	if (p->key.proto == IPPROTO_TCP) {
		t = fo_ct_tcp_established_s;
	} else {
		__u32 want = status;
		bool stream;

		if (f->flags & FO_F_CT_REPLY)
			want |= FO_IPS_SEEN_REPLY;
		stream = (want & FO_IPS_SEEN_REPLY) && fo_udp_stream(ct);
		if (stream)
			want |= FO_IPS_ASSURED;
		/* Only bits conntrack lets be set (nf_ct_change_status_common). */
		if (want != status)
			bpf_ct_change_status(ct, want);
		t = stream ? fo_ct_udp_stream_s : fo_ct_udp_s;
		/* Replied, not a stream yet: conntrack makes it one (ASSURED,
		 * the stream timeout) on its first packet two seconds after
		 * the first; look again in a second, not a whole interval.
		 */
		if ((want & FO_IPS_SEEN_REPLY) && !stream)
			f->ct_refresh_ns = now - fo_ct_interval_ns(p->key.proto) + FO_CT_REFRESH_MIN_NS;
	}
	if (t && !bpf_ct_change_timeout(ct, t * 1000))
		fo_count(FO_STAT_CT_REFRESHED, 1);
	bpf_ct_release(ct);
}

/* Whether this packet refreshes, and the tuple to look the entry up by
 * (its size; 0: not due). Stamps the direction first, so a lookup that
 * finds nothing is not repeated on every packet.
 */
static __always_inline __u32 fo_ct_begin(const struct fo_parsed *p, struct fo_flow *f, __u64 now,
					 struct bpf_sock_tuple *t)
{
	if (!fo_ct_due(f, p->key.proto, now))
		return 0;
	f->ct_refresh_ns = now;
	return fo_ct_tuple(p, t);
}

/* After the lookup (the kfuncs differ by context type only). */
static __always_inline void fo_ct_finish(struct nf_conn *ct, const struct fo_parsed *p, struct fo_flow *f, __u64 now)
{
	if (!ct) {
		fo_count(FO_STAT_CT_GONE, 1);
		return;
	}
	fo_ct_apply(ct, p, f, now);
}

/* TC: refresh through the skb's device's namespace. */
static __always_inline void fo_ct_refresh_skb(struct __sk_buff *skb, const struct fo_parsed *p, struct fo_flow *f,
					      __u64 now)
{
	struct bpf_ct_opts___fo opts = { .netns_id = FO_CT_CURRENT_NETNS, .l4proto = p->key.proto };
	struct bpf_sock_tuple t = {};
	__u32 sz = fo_ct_begin(p, f, now, &t);

	if (sz)
		fo_ct_finish(bpf_skb_ct_lookup(skb, &t, sz, &opts, FO_CT_OPTS_SZ), p, f, now);
}

/* XDP: the same through the receiving device's namespace. */
static __always_inline void fo_ct_refresh_xdp(struct xdp_md *ctx, const struct fo_parsed *p, struct fo_flow *f,
					      __u64 now)
{
	struct bpf_ct_opts___fo opts = { .netns_id = FO_CT_CURRENT_NETNS, .l4proto = p->key.proto };
	struct bpf_sock_tuple t = {};
	__u32 sz = fo_ct_begin(p, f, now, &t);

	if (sz)
		fo_ct_finish(bpf_xdp_ct_lookup(ctx, &t, sz, &opts, FO_CT_OPTS_SZ), p, f, now);
}

#endif
