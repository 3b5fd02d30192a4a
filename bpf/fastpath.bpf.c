// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* nft-offload fast path: one worker, two entry points (XDP and TC ingress),
 * and a TC egress watcher that tells the control plane which dormant
 * connections the kernel forwarded a packet of.
 * Per packet it does what nf_flow_offload_ip_hook / nf_flow_offload_ipv6_hook
 * do (net/netfilter/nf_flow_table_ip.c): parse, look up the flow by its
 * tuple and input interface, check it may still use the fast path, NAT,
 * decrement TTL, rewrite MACs, count, and transmit. Anything unusual goes to
 * the kernel, which stays the authority; the fast path never drops.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_packet.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>

#include "flow.h"
#include "maps.h"
#include "parse.h"
#include "nat.h"
#include "keepalive.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define FO_PASS 0
#define FO_FWD 1

/* From uapi bpf.h of newer kernels than the build headers: do not fold a
 * pseudo-header change into skb->csum for IPv6 (there is no IPv4 header
 * checksum compensating it), see bpf_l4_csum_replace in net/core/filter.c.
 */
#ifndef BPF_F_IPV6
#define BPF_F_IPV6 (1ULL << 7)
#endif

/* CLOCK_MONOTONIC_COARSE ns of the engine's last loop pass (0 until its
 * first): written by the control plane through the mmaped .bss.
 */
volatile __u64 fo_engine_beat_ns;

/* BPF_F_IPV6 if this kernel's bpf_l4_csum_replace knows it (6.16+ and some
 * stable trees; older ones reject the whole call with -EINVAL, leaving the
 * checksum unfixed), else 0: set by the control plane after running
 * fo_probe_csum_ipv6. 0 is the fallback, correct on every kernel.
 */
volatile __u64 fo_csum_ipv6_flag;

/* Wake-ups fo_wake had no room for: the control plane scans the dormant
 * connections only when this grows, instead of on every tick.
 */
volatile __u64 fo_wake_lost;

/* RSTs fo_rst had no room for: the control plane then restores every
 * offloaded TCP connection's timeout.
 */
volatile __u64 fo_rst_lost;

/* net.ipv4.ip_forward_update_priority (1 by default): whether ip_forward
 * sets skb->priority from the TOS. Written by the control plane at load
 * and each second after.
 */
volatile __u32 fo_ip_fwd_update_priority;

/* Set by the control plane before load (.rodata, frozen: the verifier
 * takes them as constants and never walks the branches they close, so a
 * helper or kfunc this kernel lacks is never checked; check_cond_jmp_op
 * and opt_remove_dead_code in kernel/bpf/verifier.c). Their defaults are
 * the conservative answers, right on any kernel.
 */

/* bpf_cast_to_kern_ctx is in this kernel's BTF (6.2+). */
const volatile __u8 fo_have_kern_ctx = 0;

/* How fo_secpath tells a decrypted packet (enum fo_secpath_how). */
const volatile __u8 fo_secpath_how = FO_SECPATH_ASSUME;

/* Secpath: a packet xfrm decrypted carries the SKB_EXT_SEC_PATH extension.
 * In tunnel mode xfrm_input (net/xfrm/xfrm_input.c) hands the inner packet
 * to gro_cells_receive, a NAPI of its own that delivers it through
 * __netif_receive_skb again, so TC ingress of the device it arrived on sees
 * it, secpath attached; XDP never does (native XDP runs in the driver's
 * NAPI poll on frames from the wire, and those are still ESP). The kernel
 * checks such a packet against the fwd policy's templates
 * (__xfrm_policy_check), which the fast path cannot: it goes to the kernel.
 *
 * Best read straight from the kernel's sk_buff (bpf_cast_to_kern_ctx is a
 * verifier rewrite to a register move, then one byte load, CO-RE relocated)
 * rather than with bpf_skb_get_xfrm_state, which costs a helper call
 * (measured: see SECURITY.md). Declared weak: on a kernel without it (6.1)
 * libbpf turns the call into an invalid one that fails only if reached
 * (poison_kfunc_call in libbpf.c), and fo_have_kern_ctx keeps it unreached.
 */
extern void *bpf_cast_to_kern_ctx(void *obj) __ksym __weak;

struct sk_buff___fo {
	__u8 active_extensions;
	__u8 ip_summed:2;
} __attribute__((preserve_access_index));

enum skb_ext_id___fo {
	SKB_EXT_SEC_PATH = 1,
};

static __always_inline bool fo_secpath(struct __sk_buff *skb)
{
	if (fo_secpath_how == FO_SECPATH_KFUNC && fo_have_kern_ctx) {
		struct sk_buff___fo *k;

		/* Without SKB extensions or XFRM there is no secpath: both
		 * existence checks are constants at load time.
		 */
		if (!bpf_core_field_exists(struct sk_buff___fo, active_extensions) ||
		    !bpf_core_enum_value_exists(enum skb_ext_id___fo, SKB_EXT_SEC_PATH))
			return false;
		k = bpf_cast_to_kern_ctx(skb);
		return k->active_extensions & (1 << bpf_core_enum_value(enum skb_ext_id___fo, SKB_EXT_SEC_PATH));
	}
	if (fo_secpath_how == FO_SECPATH_HELPER) {
		/* bpf_skb_get_xfrm_state (net/core/filter.c, only built with
		 * CONFIG_XFRM) answers 0 when the skb's sec_path holds a state
		 * at index 0, -EINVAL when there is none. A sec_path without
		 * states means no transform was applied: __xfrm_policy_check
		 * judges it as a clear packet too.
		 */
		struct bpf_xfrm_state x;

		return bpf_skb_get_xfrm_state(skb, 0, &x, sizeof(x), 0) == 0;
	}
	/* FO_SECPATH_NONE: a kernel without CONFIG_XFRM decrypts nothing.
	 * FO_SECPATH_ASSUME: no way to tell, so every packet may have been
	 * decrypted: none is forwarded here (counted as secpath).
	 */
	return fo_secpath_how != FO_SECPATH_NONE;
}

/* CHECKSUM_PARTIAL (include/linux/skbuff.h): the L4 checksum is left to
 * the egress device, which finds the headers from skb->protocol. No
 * __sk_buff field or helper tells it (bpf_csum_level only knows
 * CHECKSUM_UNNECESSARY), so without the kfunc every skb counts as partial:
 * the PPPoE pushes that need a full checksum take the slow path
 * (FO_SLOW_PPPOE_TC_OFFLOAD), nothing else asks.
 */
#define FO_CHECKSUM_PARTIAL 3

static __always_inline bool fo_csum_partial(struct __sk_buff *skb)
{
	struct sk_buff___fo *k;

	if (!fo_have_kern_ctx)
		return true;
	k = bpf_cast_to_kern_ctx(skb);
	return BPF_CORE_READ_BITFIELD(k, ip_summed) == FO_CHECKSUM_PARTIAL;
}

static __always_inline bool fo_mac_zero(const __u8 *a)
{
	return !(a[0] | a[1] | a[2] | a[3] | a[4] | a[5]);
}

static __always_inline bool fo_mac_eq(const __u8 *a, const __u8 *b)
{
	return !((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4]) | (a[5] ^ b[5]));
}

/* CHECKSUM_PARTIAL as XDP sees it. A local sender with TX checksum
 * offload leaves the L4 checksum to the device and puts only the folded
 * pseudo-header sum in the field, uncomplemented: tcp_v4_send_check /
 * __tcp_v6_send_check (th->check = ~tcp_v4_check(len, saddr, daddr, 0)),
 * udp4_hwcsum and udp6_hwcsum_outgoing likewise. On a veth such an skb
 * reaches native XDP (veth_xdp_rcv_skb), and once redirected it is an
 * xdp_frame, which has no ip_summed: the receiver would see a wrong
 * checksum and drop the packet. Passed to the kernel, the skb keeps its
 * ip_summed and is forwarded right. A complete checksum equals this value
 * only by chance (1 in 65536): on a port that may see partial checksums
 * that packet takes the slow path, nothing worse.
 */
static __always_inline bool fo_l4_csum_partial(void *data, void *data_end, const struct fo_parsed *p, __u32 ifindex)
{
	__u32 l4_off = p->l4_off, sum, i;
	__u16 check;

	if (l4_off > 64 + 40)
		return false;
	if (p->key.proto == IPPROTO_TCP) {
		struct tcphdr *th = data + l4_off;

		if ((void *)(th + 1) > data_end)
			return false;
		check = th->check;
	} else {
		struct udphdr *uh = data + l4_off;

		if ((void *)(uh + 1) > data_end)
			return false;
		check = uh->check;
	}
	/* Words as loaded from memory, like the checksum field: the sum is
	 * the same in either byte order once folded.
	 */
	sum = bpf_htons(p->key.proto) + bpf_htons(p->l3_len - (l4_off - p->l3_off));
#pragma unroll
	for (i = 0; i < 4; i++) {
		sum += (p->key.saddr[i] & 0xffff) + (p->key.saddr[i] >> 16);
		sum += (p->key.daddr[i] & 0xffff) + (p->key.daddr[i] >> 16);
	}
	/* Only ports where it can happen (a veth whose peer has TX checksum
	 * offload on): a frame from a wire has a complete checksum, and the
	 * map is looked at only on a match.
	 */
	return check == csum_fold32(sum) && bpf_map_lookup_elem(&fo_csum_ports, &ifindex);
}

/* The TCP header of a parsed packet, or NULL. */
static __always_inline struct tcphdr *fo_tcp(void *data, void *data_end, const struct fo_parsed *p)
{
	struct tcphdr *th;

	if (p->l4_off > 64 + 40)
		return NULL;
	th = data + p->l4_off;
	if ((void *)(th + 1) > data_end)
		return NULL;
	return th;
}

/* A segment this direction forwards: its end and its ACK, as high-water
 * marks (serial arithmetic: sequence numbers wrap), what conntrack keeps
 * as td_end and td_maxack (tcp_in_window) and cannot keep while the
 * connection is offloaded. Two CPUs racing on one flow may leave one of
 * them behind: a RST is then judged inexact and left to the kernel.
 */
static __always_inline void fo_track_tcp(void *data, void *data_end, const struct fo_parsed *p, struct fo_flow *f)
{
	struct tcphdr *th = fo_tcp(data, data_end, p);
	__u32 end, ack;

	if (!th)
		return;
	end = bpf_ntohl(th->seq) + (p->l3_len - (p->l4_off - p->l3_off) - p->l4_hdr_len);
	ack = bpf_ntohl(th->ack_seq);
	if (!f->packets || (__s32)(end - f->seq_end) > 0)
		f->seq_end = end;
	if ((p->tcp_flags & FO_TCP_ACK) && (!f->packets || (__s32)(ack - f->ack_max) > 0))
		f->ack_max = ack;
}

/* Does a RST of this direction close the connection? Only if its sequence
 * number is one the receiver takes: what the receiver acknowledged last
 * (conntrack's tcp_packet closes on seq == the receiver's td_maxack; RFC
 * 5961's RCV.NXT) or the end of what the sender sent (a RST right after
 * its last segment, tcp_packet's "RST train"; the sender's snd_nxt, which
 * the RST of an abort carries). Conntrack cannot judge it here: it saw
 * none of the offloaded packets, its td_maxack is stale and the entry is
 * liberal (set on offload, as the kernel flowtable does), so a blind RST
 * it is handed either fails its stale check or passes tcp_in_window and
 * the connection stays ESTABLISHED; the fast path must not end the
 * offload on it either. The receiver's ACK is in the other direction's
 * entry, looked up by the tuple this direction leaves with (its key is
 * this one mirrored: routes::path::mirror); only RSTs pay for it. An entry
 * that forwarded nothing yet knows nothing: the RST goes to the kernel,
 * whose own state is fresh then.
 */
static __always_inline bool fo_rst_closes(void *data, void *data_end, const struct fo_parsed *p,
					  const struct fo_flow *f)
{
	struct tcphdr *th = fo_tcp(data, data_end, p);
	struct fo_flow_key rk = {};
	struct fo_flow *r;
	__u32 seq;

	if (!th)
		return false;
	seq = bpf_ntohl(th->seq);
	if (f->packets && seq == f->seq_end)
		return true;
	rk.ifindex = f->out_ifindex;
	rk.family = p->key.family;
	rk.proto = p->key.proto;
	rk.sport = f->new_dport;
	rk.dport = f->new_sport;
	rk.encap_num = f->out_encap_num;
	rk.encap[0] = f->out_encap[0];
	rk.encap[1] = f->out_encap[1];
	__builtin_memcpy(rk.saddr, f->new_daddr, 16);
	__builtin_memcpy(rk.daddr, f->new_saddr, 16);
	r = bpf_map_lookup_elem(&fo_flows, &rk);
	return r && r->packets && seq == r->ack_max;
}

/* Decide: returns FO_FWD with the flow (*fp), the egress encapsulation and
 * the clock, or FO_PASS after counting the slow reason. Changes no byte of
 * the packet. xdp and l3dev are constants: what does not apply to an entry
 * point compiles out of it. skb is NULL for XDP.
 */
static __always_inline int fo_worker(void *data, void *data_end, const struct fo_meta *m, const bool xdp,
				     const bool l3dev, struct __sk_buff *skb, struct fo_parsed *p,
				     struct fo_flow **fp, struct fo_out_encap *o, __u64 *now)
{
	struct fo_flow *f;
	int reason;

	reason = fo_parse(data, data_end, m, l3dev, p);
	if (reason)
		goto slow;
	/* A SYN means a new connection attempt: the kernel decides. */
	if (p->key.proto == IPPROTO_TCP && (p->tcp_flags & FO_TCP_SYN)) {
		reason = FO_SLOW_TCP_SYN;
		goto slow;
	}
	/* TC cannot take the header off (see FO_SLOW_PPPOE_TC_POP): no flow
	 * is keyed so on a TC port; the kernel decapsulates it and the fast
	 * path on the ppp device above takes it (engine::ports,
	 * pppoe_uppers). Before the lookup: it could only miss.
	 */
	if (!xdp && p->pppoe_len) {
		reason = FO_SLOW_PPPOE_TC_POP;
		goto slow;
	}

	p->key.ifindex = m->ifindex;
	f = bpf_map_lookup_elem(&fo_flows, &p->key);
	if (!f) {
		/* A dormant connection is not woken here: the kernel has not
		 * decided yet (TC egress sees what it forwards).
		 */
		reason = FO_SLOW_NO_FLOW;
		goto slow;
	}
	/* A frame not addressed to the router is being bridged (a bridge
	 * port is promiscuous) or is another host's: never ours. On a bridge
	 * port the kernel marks frames for the bridge's MAC PACKET_OTHERHOST
	 * (eth_type_trans compares with the port's own), so the flow names
	 * the MAC. Without one (a control plane that does not fill it), TC
	 * still has the kernel's pkt_type.
	 */
	if (!l3dev) {
		struct ethhdr *eth = data;

		if ((void *)(eth + 1) > data_end) {
			reason = FO_SLOW_MALFORMED;
			goto slow;
		}
		if (fo_mac_zero(f->in_dmac) ? (!xdp && m->pkt_type != PACKET_HOST)
					    : !fo_mac_eq(eth->h_dest, f->in_dmac)) {
			reason = FO_SLOW_L2_NOT_HOST;
			goto slow;
		}
		/* The session id alone is 16 bits any host on the segment can
		 * guess: pppoe_rcv takes a session frame only from the
		 * concentrator (get_item(pn, sid, h_source, ifindex)). An entry
		 * without the peer's MAC takes none.
		 */
		if (p->pppoe_len && (fo_mac_zero(f->in_smac) || !fo_mac_eq(eth->h_source, f->in_smac))) {
			reason = FO_SLOW_PPPOE_PEER;
			goto slow;
		}
	}
	/* Only packets of an offloaded flow pay for this, and before any
	 * state of the flow changes.
	 */
	if (!xdp && fo_secpath(skb)) {
		reason = FO_SLOW_SECPATH;
		goto slow;
	}
	if (f->teardown) {
		reason = FO_SLOW_TEARDOWN;
		goto slow;
	}
	/* A held direction is the kernel's: stamp last_seen so keepalive and
	 * idle see the connection in use, count nothing else (conntrack counts
	 * these packets itself).
	 */
	if (f->hold) {
		f->last_seen_ns = bpf_ktime_get_coarse_ns();
		reason = f->hold == FO_HOLD_XFRM ? FO_SLOW_HELD_XFRM
			 : f->hold == FO_HOLD_INGRESS_HOOK ? FO_SLOW_HELD_INGRESS_HOOK
			 : f->hold == FO_HOLD_DORMANT ? FO_SLOW_HELD_DORMANT
			 : f->hold == FO_HOLD_XDP_TARGET ? FO_SLOW_HELD_XDP_TARGET
			 : FO_SLOW_HELD_EGRESS_HOOK;
		goto slow;
	}
	/* FIN/RST: let conntrack see the close, and stop fast-pathing this
	 * flow (nf_flow_state_check: flow_offload_teardown on FIN/RST; the
	 * control plane removes both directions). A RST only when it is in
	 * sequence (fo_rst_closes): any host that knows the tuple can send
	 * one, and the kernel flowtable's teardown on any RST is what lets it
	 * end an offloaded connection the kernel alone would keep.
	 */
	if (p->key.proto == IPPROTO_TCP && (p->tcp_flags & (FO_TCP_FIN | FO_TCP_RST))) {
		if (p->tcp_flags & FO_TCP_RST) {
			if (fo_rst_closes(data, data_end, p, f)) {
				f->teardown = FO_TD_RST;
				reason = FO_SLOW_TCP_RST;
			} else {
				reason = FO_SLOW_TCP_RST_INEXACT;
				if (bpf_ringbuf_output(&fo_rst, &p->key, sizeof(p->key), 0))
					__sync_fetch_and_add(&fo_rst_lost, 1);
			}
		} else {
			f->teardown = FO_TD_FIN;
			reason = FO_SLOW_TCP_FIN;
		}
		goto slow;
	}
	reason = fo_out_encap(f, o);
	if (reason)
		goto slow;
	/* nf_flow_exceeds_mtu: a GSO packet is fine if each segment fits.
	 * f->mtu is an L3 MTU, encapsulation already taken off.
	 */
	if (p->l3_len > f->mtu) {
		__u32 seg = p->l4_off - p->l3_off + p->l4_hdr_len + m->gso_size;

		if (!m->gso_size || seg > f->mtu) {
			reason = FO_SLOW_MTU;
			goto slow;
		}
	}
	/* After the MTU check, so a packet too big is counted as such on
	 * every kernel (without bpf_cast_to_kern_ctx every skb counts as
	 * CHECKSUM_PARTIAL here).
	 */
	if (!xdp && o->pppoe && (m->gso_size || fo_csum_partial(skb))) {
		reason = FO_SLOW_PPPOE_TC_OFFLOAD;
		goto slow;
	}
	/* The flag says the control plane meant it; the lookup says the port
	 * is still a redirect target now (it may be leaving): checked before
	 * the rewrite, so a failed redirect never passes a rewritten frame.
	 * An L3 device is never one (XDP needs a link-layer header).
	 */
	if (xdp && ((f->flags & FO_F_L3_OUT) || !(f->flags & FO_F_XDP_OK) ||
		    !bpf_map_lookup_elem(&fo_tx_ports, &f->out_ifindex))) {
		reason = FO_SLOW_XDP_TARGET;
		goto slow;
	}
	if (xdp && fo_l4_csum_partial(data, data_end, p, m->ifindex)) {
		reason = FO_SLOW_CSUM_PARTIAL;
		goto slow;
	}
	/* Last check before the rewrite, so only packets that would be
	 * forwarded pay for it (one load; the clock read is reused).
	 */
	*now = bpf_ktime_get_coarse_ns();
	if (*now > fo_engine_beat_ns + FO_STALE_ENGINE_NS) {
		reason = FO_SLOW_STALE_ENGINE;
		goto slow;
	}
	if (p->key.proto == IPPROTO_TCP)
		fo_track_tcp(data, data_end, p, f);
	*fp = f;
	return FO_FWD;

slow:
	fo_count(reason, 1);
	return FO_PASS;
}

/* skb->priority as the kernel's forwarding leaves it: ip_forward sets
 * rt_tos2priority(tos) (ip_tos2prio[IPTOS_TOS(tos) >> 1] in
 * net/ipv4/route.c: TC_PRIO_BESTEFFORT 0, BULK 2, INTERACTIVE 6,
 * INTERACTIVE_BULK 4 by the TOS bits 0x18) when
 * net.ipv4.ip_forward_update_priority is on; ip6_forward does not touch it,
 * and it arrives 0 (a port's driver, veth's __dev_forward_skb and a VLAN
 * device without an ingress QoS map all give 0; the control plane does not
 * offload a connection whose VLAN device has one). So 0, 2, 4 or 6, the
 * priorities fo_flow.out_pcp maps. TC, which has the skb, takes the
 * priority it came with where ip_forward would keep it (fo_tc_priority).
 */
static __always_inline __u32 fo_priority(const struct fo_parsed *p)
{
	if (p->key.family != AF_INET || !fo_ip_fwd_update_priority)
		return 0;
	switch ((p->tos >> 3) & 3) {
	case 1:
		return 2;
	case 2:
		return 6;
	case 3:
		return 4;
	default:
		return 0;
	}
}

/* The skb's priority after forwarding, or -1 when the fast path cannot
 * write the PCP the kernel would: ip_forward's from the TOS (fo_priority),
 * else the one the skb came with, which out_pcp maps only for 0, 2, 4, 6
 * (something before us gave it another: a tc action on a legacy hook).
 */
static __always_inline int fo_tc_priority(const struct __sk_buff *skb, const struct fo_parsed *p,
					  const struct fo_out_encap *o)
{
	__u32 prio = skb->priority;

	if (p->key.family == AF_INET && fo_ip_fwd_update_priority)
		return fo_priority(p);
	if (o->vlans && (prio > 6 || (prio & 1)))
		return -1;
	return prio;
}

/* A forwarded packet: per-flow and global counters. */
static __always_inline void fo_account(struct fo_flow *f, const struct fo_meta *m, const struct fo_parsed *p,
				       __u64 now)
{
	__u64 pkts = m->gso_segs > 1 ? m->gso_segs : 1;
	__u64 bytes = p->l3_len;

	__sync_fetch_and_add(&f->packets, pkts);
	__sync_fetch_and_add(&f->bytes, bytes);
	f->last_seen_ns = now;
	fo_count(FO_STAT_FWD_PACKETS, pkts);
	fo_count(FO_STAT_FWD_BYTES, bytes);
}

/* The receive metadata's VLAN tag (6.8+, drivers/net/veth.c
 * veth_xdp_rx_vlan_tag, mlx5, ice, ...): callable only from a program
 * bound to its device (BPF_F_XDP_DEV_BOUND_ONLY), which fo_xdp_md is when
 * the control plane loads it for one port. Weak: on a kernel without it
 * the program that calls it is never loaded (fo_rx_vlan_md stays false).
 */
extern int bpf_xdp_metadata_rx_vlan_tag(const struct xdp_md *ctx, __be16 *vlan_proto, __u16 *vlan_tci) __ksym __weak;

/* Set by the control plane before loading the device-bound instance of
 * fo_xdp_md, only where the driver exposes the tag (the netdev family's
 * xdp-rx-metadata-features has vlan-tag).
 */
const volatile bool fo_rx_vlan_md = false;

/* md: read a tag the NIC (or the veth's peer) took off the frame from the
 * receive metadata, as TC reads skb->vlan_tci: it keys as the outermost
 * header (nf_flow_tuple_encap), then the frame's own.
 */
static __always_inline int fo_xdp_run(struct xdp_md *ctx, const bool md)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct fo_meta m = {
		.ifindex = ctx->ingress_ifindex,
		.pkt_len = data_end - data,
	};
	struct fo_parsed p = {};
	struct fo_out_encap o;
	struct fo_l4_fix fix = {};
	struct fo_flow *f = NULL;
	__u64 now = 0;
	int delta;

	if (md && fo_rx_vlan_md && bpf_ksym_exists(bpf_xdp_metadata_rx_vlan_tag)) {
		__be16 proto = 0;
		__u16 tci = 0;

		if (!bpf_xdp_metadata_rx_vlan_tag(ctx, &proto, &tci)) {
			m.vlan_present = 1;
			m.vlan_proto = proto;
			m.vlan_tci = tci;
		}
	}
	if (fo_worker(data, data_end, &m, true, false, NULL, &p, &f, &o, &now) != FO_FWD || !f)
		return XDP_PASS;
	/* Ethernet padding after the IP packet (a short frame padded to the
	 * minimum): the kernel trims it before forwarding (ip_rcv_core,
	 * ipv6_rcv: pskb_trim_rcsum), so the egress device pads what it sends
	 * itself, and a pushed header never has it behind. Should the head
	 * adjustment below fail, the kernel gets the frame as it trims it.
	 */
	delta = (int)(data_end - data) - (int)(p.l3_off + p.l3_len);
	if (delta > 0 && bpf_xdp_adjust_tail(ctx, -delta)) {
		fo_count(FO_SLOW_ENCAP, 1);
		return XDP_PASS;
	}
	/* Take the ingress headers off and make room for the egress ones in
	 * one move (nf_flow_encap_pop, then what the VLAN / PPPoE devices
	 * would push); the whole new link-layer header is written below.
	 */
	delta = (int)p.l3_off - (int)o.l2_len;
	if (delta && bpf_xdp_adjust_head(ctx, delta)) {
		fo_count(FO_SLOW_ENCAP, 1);
		return XDP_PASS;
	}
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (fo_write_l2(data, data_end, f, &o, p.key.family, p.l3_len, fo_priority(&p)) ||
	    fo_rewrite(data, data_end, o.l2_len, &p, f, true, &fix)) {
		fo_count(FO_STAT_TX_FAILED, 1);
		return XDP_DROP;
	}
	fo_account(f, &m, &p, now);
	fo_ct_refresh_xdp(ctx, &p, f, now);
	/* The worker found the port in fo_tx_ports; the control plane removes
	 * links and flows before it removes ports.
	 */
	return bpf_redirect_map(&fo_tx_ports, f->out_ifindex, XDP_PASS);
}

SEC("xdp")
int fo_xdp(struct xdp_md *ctx)
{
	return fo_xdp_run(ctx, false);
}

/* The same, for a port whose VLAN tags may arrive in the receive
 * metadata: loaded once per such port, bound to it, sharing every map.
 */
SEC("xdp")
int fo_xdp_md(struct xdp_md *ctx)
{
	return fo_xdp_run(ctx, true);
}

/* The most the parser reads (fo_parse): Ethernet, two tags or a tag and a
 * PPPoE session header, an IPv6 header, the fixed TCP header. IP options
 * and IPv6 extension headers send the packet to the kernel, TCP options
 * are never read.
 */
#define FO_HDR_MAX (14 + 2 * FO_VLAN_HLEN + FO_PPPOE_HLEN + 40 + 20)

/* How many bytes of this skb the parser reads, from the headers
 * themselves (bpf_skb_load_bytes reads paged data too): at most
 * FO_HDR_MAX, fewer for most packets.
 */
static __always_inline __u32 fo_header_bytes(struct __sk_buff *skb, const bool l3dev)
{
	__be16 proto = skb->protocol;
	__u32 off = 0, added;
	__u8 l4 = 0;

	if (!l3dev) {
		off = sizeof(struct ethhdr);
		if (bpf_skb_load_bytes(skb, __builtin_offsetof(struct ethhdr, h_proto), &proto, sizeof(proto)))
			return FO_HDR_MAX;
#pragma unroll
		for (int i = 0; i < FO_ENCAP_MAX; i++) {
			if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD))
				added = FO_VLAN_HLEN;
			else if (proto == bpf_htons(ETH_P_PPP_SES))
				added = FO_PPPOE_HLEN;
			else
				break;
			off += added;
			/* The last two bytes of either: the inner ethertype, or
			 * the PPP protocol.
			 */
			if (bpf_skb_load_bytes(skb, off - 2, &proto, sizeof(proto)))
				return FO_HDR_MAX;
			if (added == FO_PPPOE_HLEN) {
				if (proto == bpf_htons(FO_PPP_IP))
					proto = bpf_htons(ETH_P_IP);
				else if (proto == bpf_htons(FO_PPP_IPV6))
					proto = bpf_htons(ETH_P_IPV6);
				else
					return off;
			}
		}
	}
	if (proto == bpf_htons(ETH_P_IP)) {
		if (bpf_skb_load_bytes(skb, off + __builtin_offsetof(struct iphdr, protocol), &l4, 1))
			return FO_HDR_MAX;
		off += sizeof(struct iphdr);
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		if (bpf_skb_load_bytes(skb, off + __builtin_offsetof(struct ipv6hdr, nexthdr), &l4, 1))
			return FO_HDR_MAX;
		off += sizeof(struct ipv6hdr);
	} else {
		return off;
	}
	if (l4 == IPPROTO_TCP)
		off += sizeof(struct tcphdr);
	else if (l4 == IPPROTO_UDP)
		off += sizeof(struct udphdr);
	return off;
}

/* Headers are normally linear in an skb; pull the ones the parser reads
 * if not, and no more. A local TCP sender's skb (veth, a container's or
 * VM's traffic) has its headers linear and the payload in page fragments:
 * pulling past the headers copies payload into the head
 * (__pskb_pull_tail), reallocating it when its tailroom is short, for
 * every packet. Only a packet whose linear part ends inside the headers
 * pays for reading them here first.
 */
static __always_inline void fo_pull_headers(struct __sk_buff *skb, const bool l3dev)
{
	__u32 need = FO_HDR_MAX;

	if (need > skb->len)
		need = skb->len;
	if ((long)skb->data + need <= (long)skb->data_end)
		return;
	need = fo_header_bytes(skb, l3dev);
	if (need > skb->len)
		need = skb->len;
	if ((long)skb->data + need > (long)skb->data_end) {
		bpf_skb_pull_data(skb, need);
		fo_count(FO_STAT_HDR_PULLED, 1);
	}
}

static __always_inline void fo_tc_meta(struct __sk_buff *skb, struct fo_meta *m)
{
	m->ifindex = skb->ifindex;
	m->pkt_len = skb->len;
	m->gso_segs = skb->gso_segs;
	m->gso_size = skb->gso_size;
	m->pkt_type = skb->pkt_type;
	m->vlan_present = skb->vlan_present;
	m->vlan_proto = skb->vlan_proto;
	m->vlan_tci = skb->vlan_tci;
	m->protocol = skb->protocol;
}

/* TCX ingress, on an Ethernet device (fo_tc) or one without a link-layer
 * header (fo_tc_l3). Slow path returns TCX_NEXT (== TC_ACT_UNSPEC) so
 * programs attached after ours still run; with none, the packet goes up
 * the stack.
 */
static __always_inline int fo_tc_run(struct __sk_buff *skb, const bool l3dev)
{
	void *data, *data_end;
	struct fo_meta m;
	struct fo_parsed p = {};
	struct fo_out_encap o;
	struct fo_l4_fix fix = {};
	struct fo_flow *f = NULL;
	__u32 l3_off = 0;
	__u64 mm0, flags, now = 0;
	int r, prio;

	fo_pull_headers(skb, l3dev);
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	fo_tc_meta(skb, &m);

	if (fo_worker(data, data_end, &m, false, l3dev, skb, &p, &f, &o, &now) != FO_FWD || !f)
		return TC_ACT_UNSPEC;
	prio = fo_tc_priority(skb, &p, &o);
	if (prio < 0) {
		fo_count(FO_SLOW_ENCAP, 1);
		return TC_ACT_UNSPEC;
	}
	/* Ethernet padding after the IP packet: trimmed, as ip_rcv_core and
	 * ipv6_rcv trim it (pskb_trim_rcsum) before the kernel forwards; it
	 * would otherwise follow a pushed tag or PPPoE header, or go into an
	 * L3 device as part of the packet. skb_trim_rcsum keeps
	 * CHECKSUM_COMPLETE right (__bpf_skb_change_tail).
	 */
	if (skb->len > p.l3_off + p.l3_len && bpf_skb_change_tail(skb, p.l3_off + p.l3_len, 0)) {
		fo_count(FO_SLOW_ENCAP, 1);
		return TC_ACT_UNSPEC;
	}
	r = fo_tc_l2(skb, p.key.encap_num, p.key.family, p.l3_len, f, &o, l3dev, prio, &l3_off);
	if (r > 0) {
		fo_count(FO_SLOW_ENCAP, 1);
		return TC_ACT_UNSPEC;
	}
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	if (r < 0 || fo_rewrite(data, data_end, l3_off, &p, f, false, &fix)) {
		fo_count(FO_STAT_TX_FAILED, 1);
		return TC_ACT_SHOT;
	}
	/* After the direct writes: fix the L4 checksum through the kernel so
	 * ip_summed is honoured (inet_proto_csum_replace_by_diff).
	 */
	mm0 = fix.udp ? BPF_F_MARK_MANGLED_0 : 0;
	if (fix.pseudo) {
		__u64 v6 = fix.ipv6 ? fo_csum_ipv6_flag : 0;

		flags = BPF_F_PSEUDO_HDR | mm0 | v6;
		bpf_l4_csum_replace(skb, fix.csum_off, 0, fix.pseudo, flags);
		/* Without BPF_F_IPV6 the kernel takes the pseudo-header change
		 * out of a CHECKSUM_COMPLETE skb->csum, as is right for IPv4
		 * (whose header checksum cancels the address change) but not for
		 * IPv6: put it back (a no-op for other ip_summed values).
		 */
		if (fix.ipv6 && !v6)
			bpf_csum_update(skb, fix.pseudo);
	}
	if (fix.ports)
		bpf_l4_csum_replace(skb, fix.csum_off, 0, fix.ports, mm0);
	/* The hop limit was written directly, and IPv6 has no header checksum
	 * to absorb it: a CHECKSUM_COMPLETE skb->csum takes the change (a
	 * no-op for other ip_summed values), or the receiver of a veth would
	 * find its sum wrong. ip6_forward drops such a csum instead
	 * (skb_forward_csum); the bytes on the wire are the same.
	 */
	if (fix.ipv6)
		bpf_csum_update(skb, csum_hl_dec_diff());
	/* The egress qdisc (pfifo_fast's bands, mqprio's queues, HTB or prio
	 * classes by priority) and a VLAN device the skb is sent into see the
	 * priority ip_forward would have set; IPv6 keeps the one it came with
	 * (prio is that one then).
	 */
	skb->priority = prio;
	fo_account(f, &m, &p, now);
	fo_ct_refresh_skb(skb, &p, f, now);
	return bpf_redirect(f->out_ifindex, 0);
}

SEC("tcx/ingress")
int fo_tc(struct __sk_buff *skb)
{
	return fo_tc_run(skb, false);
}

/* On ppp, WireGuard, tun, ipip/gre (no Ethernet header): the packet starts
 * at its IP header, skb->protocol says which; no encapsulation, no MAC.
 */
SEC("tcx/ingress")
int fo_tc_l3(struct __sk_buff *skb)
{
	return fo_tc_run(skb, true);
}

/* The input mark of BPF_FIB_LOOKUP_MARK (6.10) shares its four bytes with
 * the output smac; older uapi headers name only smac.
 */
static __always_inline void fib_set_mark(struct bpf_fib_lookup *fib, __u32 mark)
{
	__builtin_memcpy(fib->smac, &mark, sizeof(mark));
}

/* Control-plane probe, run once with BPF_PROG_TEST_RUN on any frame:
 * 0 if bpf_l4_csum_replace accepts BPF_F_IPV6, -EINVAL if not. A diff of 0
 * changes nothing.
 */
SEC("tc")
int fo_probe_csum_ipv6(struct __sk_buff *skb)
{
	return bpf_l4_csum_replace(skb, 16, 0, 0, BPF_F_PSEUDO_HDR | BPF_F_IPV6);
}

static __always_inline int fo_egress_watch(struct __sk_buff *skb, const bool l3dev)
{
	struct fo_parsed p = {};
	struct fo_meta m;
	__u32 zero = 0, *watching, *below, dev = skb->ifindex;
	__u64 *seen;

	watching = bpf_map_lookup_elem(&fo_watching, &zero);
	if (!watching || !*watching)
		return TC_ACT_UNSPEC;
	/* Seen already above, before a qdisc it may have waited in (enum
	 * fo_below): __dev_queue_xmit runs sch_handle_egress before the
	 * device's qdisc, so only the upper device's watcher tells when the
	 * kernel forwarded it.
	 */
	below = bpf_map_lookup_elem(&fo_watch_below, &dev);
	if (below && *below == FO_BELOW_ALL)
		return TC_ACT_UNSPEC;
	fo_pull_headers(skb, l3dev);
	fo_tc_meta(skb, &m);
	/* Same parser as the worker: what it would not fast-path (a TTL
	 * that is now 1, options, fragments) wakes nothing.
	 */
	if (fo_parse((void *)(long)skb->data, (void *)(long)skb->data_end, &m, l3dev, &p))
		return TC_ACT_UNSPEC;
	if (below && *below == FO_BELOW_ENCAP && p.key.encap_num)
		return TC_ACT_UNSPEC;
	/* Keys name no interface and no encapsulation (flow::egress_key):
	 * the same connection is one key on whichever device it leaves.
	 */
	p.key.ifindex = 0;
	p.key.encap_num = 0;
	__builtin_memset(p.key.encap, 0, sizeof(p.key.encap));
	seen = bpf_map_lookup_elem(&fo_dormant, &p.key);
	if (seen) {
		/* Two CPUs may both see 0 and both notify: harmless. */
		if (!*seen && bpf_ringbuf_output(&fo_wake, &p.key, sizeof(p.key), 0))
			__sync_fetch_and_add(&fo_wake_lost, 1);
		*seen = bpf_ktime_get_coarse_ns();
	}
	return TC_ACT_UNSPEC;
}

/* TCX egress on every managed interface, in both modes (in XDP mode the
 * packets the kernel forwards still leave through TC egress). A packet of a
 * dormant connection seen here was forwarded by the kernel, past the
 * current ruleset: the one piece of evidence on which the control plane
 * puts the connection back on the fast path. Never changes the packet
 * (bpf_skb_pull_data only linearises headers) and always lets it go.
 */
SEC("tcx/egress")
int fo_tc_egress(struct __sk_buff *skb)
{
	return fo_egress_watch(skb, false);
}

/* The same on a device without a link-layer header. */
SEC("tcx/egress")
int fo_tc_egress_l3(struct __sk_buff *skb)
{
	return fo_egress_watch(skb, true);
}

/* Control-plane helper, run with BPF_PROG_TEST_RUN: the packet data is a
 * struct fo_fib_req; answer it with the kernel's FIB and neighbour table.
 */
SEC("xdp")
int fo_fib_query(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct fo_fib_req *req = data;
	struct bpf_fib_lookup fib = {};
	int ret;

	if ((void *)(req + 1) > data_end)
		return XDP_ABORTED;

	fib.family = req->family;
	fib.tos = req->tos;
	fib.l4_protocol = req->proto;
	fib.sport = req->sport;
	fib.dport = req->dport;
	fib.ifindex = req->ifindex_in;
	if (req->family == AF_INET) {
		fib.ipv4_src = req->src[0];
		fib.ipv4_dst = req->dst[0];
	} else {
		__builtin_memcpy(fib.ipv6_src, req->src, 16);
		__builtin_memcpy(fib.ipv6_dst, req->dst, 16);
	}
	/* First ask with an impossible length: the MTU check fails and
	 * reports the route MTU (bpf_ipv4_fib_lookup in net/core/filter.c).
	 */
	fib.tot_len = 0xffff;
	fib_set_mark(&fib, req->mark);
	ret = bpf_fib_lookup(ctx, &fib, sizeof(fib), req->flags);
	if (ret == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
		req->mtu = fib.mtu_result;
		fib.tot_len = 0;
		fib.ifindex = req->ifindex_in;
		if (req->family == AF_INET) {
			fib.ipv4_src = req->src[0];
			fib.ipv4_dst = req->dst[0];
		} else {
			__builtin_memcpy(fib.ipv6_src, req->src, 16);
			__builtin_memcpy(fib.ipv6_dst, req->dst, 16);
		}
		/* The first answer wrote smac over the mark. */
		fib_set_mark(&fib, req->mark);
		ret = bpf_fib_lookup(ctx, &fib, sizeof(fib), req->flags);
	} else {
		req->mtu = 0xffff;
	}
	req->ret = ret;
	req->ifindex_out = fib.ifindex;
	__builtin_memcpy(req->smac, fib.smac, 6);
	__builtin_memcpy(req->dmac, fib.dmac, 6);
	/* bpf_ipv4/6_fib_lookup write the gateway into the destination before
	 * they look up the neighbour, so this is the next hop (filter.c). An
	 * IPv4 route via an IPv6 gateway (RFC 5549) switches fib.family: the
	 * next hop is then left zero (unknown) rather than misread.
	 */
	if (fib.family != req->family)
		__builtin_memset(req->nh, 0, sizeof(req->nh));
	else if (req->family == AF_INET)
		req->nh[0] = fib.ipv4_dst;
	else
		__builtin_memcpy(req->nh, fib.ipv6_dst, 16);
	return XDP_PASS;
}

/* Never read: they put these types into the object's BTF so the generated
 * Rust skeleton defines them (the control plane builds fo_fib_req, names
 * the fo_stat counters, sets fo_flow_flag bits, fo_hold and fo_below codes and
 * fo_secpath_how, and reads fo_teardown codes).
 */
const volatile struct fo_fib_req fo_btf_fib_req;
const volatile enum fo_stat fo_btf_stat;
const volatile enum fo_flow_flag fo_btf_flow_flag;
const volatile enum fo_teardown fo_btf_teardown;
const volatile enum fo_hold fo_btf_hold;
const volatile enum fo_below fo_btf_below;
const volatile enum fo_secpath_how fo_btf_secpath_how;
