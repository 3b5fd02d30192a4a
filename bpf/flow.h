/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Structures shared by the fast path and the control plane. This is the only
 * definition: the Rust side uses the types libbpf-cargo generates from BTF.
 * Field order avoids implicit padding so keys hash identically on both sides.
 */
#ifndef FO_FLOW_H
#define FO_FLOW_H

#include <linux/types.h>

/* One direction of an offloaded connection, as seen on the wire when it
 * arrives (mirrors struct flow_offload_tuple's key part in
 * include/net/netfilter/nf_flow_table.h: addresses, ports, l3/l4 proto and
 * the input interface).
 */
/* One header between Ethernet and IP, as flow_offload_tuple.encap[] holds
 * it (nf_flow_table.h): a VLAN tag (802.1Q or 802.1ad) or a PPPoE session
 * header. A tag the driver stripped into skb metadata counts as the
 * outermost one, as in nf_flow_tuple_encap (nf_flow_table_ip.c).
 */
struct fo_encap {
	__be16 proto;	/* ETH_P_8021Q, ETH_P_8021AD or ETH_P_PPP_SES */
	__u16 id;	/* VLAN id (12 bits) or PPPoE session id; host order */
};

/* At most this many headers, like NF_FLOW_TABLE_ENCAP_MAX. */
#define FO_ENCAP_MAX 2

struct fo_flow_key {
	__u32 ifindex;	/* ingress interface (the port the fast path runs on) */
	__u8 family;	/* AF_INET or AF_INET6 */
	__u8 proto;	/* IPPROTO_TCP or IPPROTO_UDP */
	__be16 sport;
	__be16 dport;
	__u8 encap_num;	/* headers in encap[], outermost first */
	__u8 pad;	/* always zero */
	struct fo_encap encap[FO_ENCAP_MAX];	/* unused slots zero */
	__be32 saddr[4];	/* IPv4 uses [0]; the rest stays zero */
	__be32 daddr[4];
};

/* Enums rather than #defines: enums reach the object's BTF, so the Rust
 * side gets these values from the generated skeleton types instead of
 * retyping them (fastpath.bpf.c anchors the ones no field refers to).
 */

/* Bits of fo_flow.flags, set by the control plane. */
enum fo_flow_flag {
	FO_F_SNAT	= 0x01,
	FO_F_DNAT	= 0x02,
	FO_F_XDP_OK	= 0x04,	/* egress is in fo_tx_ports (XDP redirect target) */
	FO_F_L3_OUT	= 0x08,	/* egress has no link-layer header (ppp, wg, tun) */
	/* The fast path refreshes the connection's conntrack entry as it
	 * forwards this direction (bpf/keepalive.h).
	 */
	FO_F_CT_REFRESH	= 0x10,
	FO_F_CT_REPLY	= 0x20,	/* this direction is conntrack's reply */
};

/* fo_flow.hold, set by the control plane: this direction matches a flow
 * entry but must go through the kernel because something the fast path
 * would skip applies to it (the other direction may stay fast). The kernel
 * flowtable has no such state: its hooks run after tc ingress and netdev
 * ingress and it hands xfrm routes to xfrm (nf_flow_table_ip.c,
 * nf_flow_offload_ip_hook, FLOW_OFFLOAD_XMIT_XFRM); we cannot, so we step
 * aside for that direction.
 */
enum fo_hold {
	FO_HOLD_NONE = 0,
	FO_HOLD_XFRM,		/* its route goes through an xfrm policy */
	FO_HOLD_INGRESS_HOOK,	/* tc filter / netdev chain on the input device */
	FO_HOLD_EGRESS_HOOK,	/* netdev chain (or XDP-bypassed tc/qdisc) on the output */
	/* Still dormant: the connection came back to the fast path on evidence
	 * that the kernel forwarded a packet of the other direction, none yet
	 * of this one (a blocked client's uploads while the server retransmits).
	 */
	FO_HOLD_DORMANT,
	/* XDP in, and the output cannot take XDP frames (a veth whose peer
	 * has no NAPI, a driver without ndo_xdp_xmit): a redirect there is
	 * lost (veth_xdp_xmit, __xdp_enqueue), the kernel's path is not.
	 */
	FO_HOLD_XDP_TARGET,
};

/* fo_watch_below: what the egress watcher on a managed device leaves to a
 * managed device stacked above it. That device's own watcher saw the packet
 * where the kernel's forward path handed it over, before its qdisc; seen
 * again down here it may have waited in that qdisc across a ruleset change
 * (cake on pppoe-wan above eth1), so it is no evidence of what the kernel
 * does now.
 */
enum fo_below {
	FO_BELOW_NONE = 0,
	FO_BELOW_ENCAP,	/* tagged or PPPoE frames came down from a managed VLAN or ppp device */
	FO_BELOW_ALL,	/* a port of a managed bridge: routed frames came down from it */
};

/* fo_flow.teardown, set by the fast path when a packet ends the flow.
 * Zero is a live flow (entries start zeroed). The control plane keeps the
 * larger code of the two directions, so RST ranks above FIN.
 */
enum fo_teardown {
	FO_TD_NONE = 0,
	FO_TD_FIN,
	FO_TD_RST,
};

/* What to do with a packet that matched: the rewrite and the next hop.
 * Laid out without holes: 128 bytes, a multiple of 8, as the kernel rounds
 * a hash map's value (htab_map_alloc in kernel/bpf/hashtab.c). Each
 * direction costs sizeof(struct htab_elem) (48) + the key (56) + this +
 * the allocator's 8-byte header, and one 16-byte bucket;
 * ARCHITECTURE.md ("Memory per connection") has the arithmetic.
 */
struct fo_flow {
	__be32 new_saddr[4];	/* addresses after NAT (unchanged if no NAT) */
	__be32 new_daddr[4];
	__be16 new_sport;
	__be16 new_dport;
	/* One's-complement differences (RFC 1624), precomputed by the control
	 * plane so the fast path does one add per checksum. Values are sums of
	 * 16-bit words as loaded from memory, folded to 16 bits.
	 */
	__u16 csum_l3;		/* IPv4 header: address change */
	__u16 csum_l4_pseudo;	/* L4 pseudo-header: address change */
	__u16 csum_l4_ports;	/* L4 header: port change */
	__u16 mtu;		/* route MTU toward the next hop (L3 bytes) */
	__u32 out_ifindex;
	__u8 flags;
	__u8 hold;		/* enum fo_hold */
	__u8 teardown;		/* enum fo_teardown; written by the fast path */
	__u8 out_encap_num;	/* headers to push on egress, outermost first */
	__u8 dmac[6];		/* next hop */
	__u8 smac[6];		/* egress interface */
	/* The router's MAC on the input port: a frame addressed elsewhere is
	 * being bridged or is for another host and is not touched. All zero
	 * when the input has no link-layer header.
	 */
	__u8 in_dmac[6];
	struct fo_encap out_encap[FO_ENCAP_MAX];
	/* The PPPoE access concentrator's MAC when this direction arrives in
	 * a PPPoE session: pppoe_rcv (drivers/net/ppp/pppoe.c) takes a
	 * session frame only from its peer (get_item by id, source MAC and
	 * device). All zero otherwise.
	 */
	__u8 in_smac[6];
	/* The 802.1p priority (PCP) of each pushed tag by skb->priority, as
	 * the VLAN device's egress QoS map gives it
	 * (vlan_dev_get_egress_qos_mask): bits 3k..3k+2 hold the PCP for
	 * priority 2k (k = 0..3), the only priorities a forwarded packet gets
	 * (rt_tos2priority; fo_priority in fastpath.bpf.c). Zero for a tag a
	 * bridge pushes (its PVID, no priority).
	 */
	__u16 out_pcp[FO_ENCAP_MAX];
	/* TCP, written by the fast path on every packet it forwards, valid
	 * once packets is non-zero: the end of the highest segment sent this
	 * way (the sender's snd_nxt, conntrack's td_end) and the highest ACK
	 * (the sender's rcv_nxt, td_maxack). A RST is judged with them
	 * (fo_rst_closes); host order.
	 */
	__u32 seq_end;
	__u32 ack_max;
	/* When this direction last refreshed the conntrack entry
	 * (FO_F_CT_REFRESH; bpf_ktime_get_coarse_ns), written by the fast path.
	 */
	__u64 ct_refresh_ns;
	/* written by the fast path, read by the control plane */
	__u64 packets;
	__u64 bytes;		/* L3 bytes, as conntrack accounting counts */
	__u64 last_seen_ns;	/* CLOCK_MONOTONIC (coarse) */
};

/* Per-CPU counters: index into fo_stats. Every slow-path exit has a reason.
 * The control plane names each counter after its enumerator, without the
 * FO_STAT_ / FO_SLOW_ prefix and in lower case (FO_SLOW_NO_FLOW is
 * "no_flow" in `status`; build.rs reads them from the BTF), so adding a
 * reason here is the whole change, and renaming one renames the counter.
 */
enum fo_stat {
	FO_STAT_FWD_PACKETS = 0,
	FO_STAT_FWD_BYTES,
	/* Keepalive in the fast path (bpf/keepalive.h): conntrack entries
	 * refreshed, and lookups that found no entry (it is being destroyed:
	 * the engine hears of it). Not slow-path exits.
	 */
	FO_STAT_CT_REFRESHED,
	FO_STAT_CT_GONE,
	/* TC: packets whose linear part ended inside the headers, which the
	 * fast path pulled into it (fo_pull_headers). Not a slow-path exit.
	 */
	FO_STAT_HDR_PULLED,
	FO_SLOW_NOT_IP,		/* ARP, LLDP, ... */
	FO_SLOW_ENCAP,		/* encapsulation the fast path does not handle */
	FO_SLOW_L2_NOT_HOST,	/* broadcast, multicast, other host */
	FO_SLOW_MALFORMED,	/* truncated or inconsistent headers */
	FO_SLOW_FRAGMENT,
	FO_SLOW_IP_OPTIONS,
	FO_SLOW_IPV6_EXT,
	FO_SLOW_NOT_TCP_UDP,
	FO_SLOW_TTL,		/* TTL / hop limit <= 1: kernel sends ICMP */
	FO_SLOW_TCP_SYN,
	FO_SLOW_TCP_FIN,
	FO_SLOW_TCP_RST,	/* a RST the receiver takes as a close: teardown */
	/* Any other RST (a blind guess above all): to the kernel, the flow
	 * stays (fo_rst_closes in fastpath.bpf.c).
	 */
	FO_SLOW_TCP_RST_INEXACT,
	FO_SLOW_NO_FLOW,
	FO_SLOW_TEARDOWN,	/* flow already ending */
	FO_SLOW_MTU,		/* kernel sends frag-needed / PTB */
	FO_SLOW_XDP_TARGET,	/* egress cannot take an XDP redirect */
	FO_SLOW_STALE_ENGINE,	/* control plane's heartbeat too old */
	FO_SLOW_HELD_XFRM,		/* direction held: enum fo_hold */
	FO_SLOW_HELD_INGRESS_HOOK,
	FO_SLOW_HELD_EGRESS_HOOK,
	FO_SLOW_HELD_DORMANT,
	FO_SLOW_HELD_XDP_TARGET,
	FO_SLOW_SECPATH,	/* arrived decrypted by xfrm (TC only) */
	/* TC cannot take a PPPoE header off: bpf_skb_adjust_room refuses an
	 * skb whose protocol is not IP (net/core/filter.c); attach to the
	 * ppp device instead, which sees plain IP.
	 */
	FO_SLOW_PPPOE_TC_POP,
	/* TC would push PPPoE onto a GSO or CHECKSUM_PARTIAL skb: its
	 * protocol stays IP, so segmentation would copy one PPPoE length into
	 * every segment and the NIC would offload a checksum it cannot find.
	 */
	FO_SLOW_PPPOE_TC_OFFLOAD,
	/* A PPPoE session frame from another MAC than the session's
	 * concentrator: pppoe_rcv drops it (get_item keys the session on its
	 * id, the peer's MAC and the device), so the kernel must see it.
	 */
	FO_SLOW_PPPOE_PEER,
	/* XDP only: the L4 checksum field holds just the pseudo-header sum,
	 * what a CHECKSUM_PARTIAL skb from a local sender carries (veth);
	 * an xdp_frame cannot say the checksum is still to be filled in.
	 */
	FO_SLOW_CSUM_PARTIAL,
	/* A helper failed (out of memory) after the frame had changed:
	 * dropped, as the kernel drops what it cannot allocate for; never
	 * handed on half rewritten.
	 */
	FO_STAT_TX_FAILED,
	FO_STAT_MAX,
};

/* How the TC entry tells a packet xfrm decrypted (fo_secpath_how in
 * fastpath.bpf.c), chosen by the control plane from what the kernel has.
 * Zero is the answer that is right without knowing anything.
 */
enum fo_secpath_how {
	FO_SECPATH_ASSUME = 0,	/* no way to tell: every packet may be (slow path) */
	FO_SECPATH_KFUNC,	/* bpf_cast_to_kern_ctx (6.2+): the skb's extensions */
	FO_SECPATH_HELPER,	/* bpf_skb_get_xfrm_state (CONFIG_XFRM) */
	FO_SECPATH_NONE,	/* no CONFIG_XFRM: nothing is ever decrypted */
};

/* How old the control plane's heartbeat (fo_engine_beat_ns) may be before
 * the fast path steps aside: a stalled engine no longer follows conntrack,
 * routes or the ruleset, so its entries may be stale. The engine writes the
 * beat on every loop pass (at least every 100 ms).
 */
#define FO_STALE_ENGINE_NS (3ULL * 1000 * 1000 * 1000)

/* Route query run through BPF_PROG_TEST_RUN by the control plane so it gets
 * exactly the kernel's forwarding decision (bpf_fib_lookup), neighbour MAC
 * included, without mirroring the FIB in userspace.
 */
struct fo_fib_req {
	__u32 family;
	__u32 ifindex_in;
	__u32 proto;
	__be16 sport;
	__be16 dport;
	__be32 src[4];
	__be32 dst[4];
	__u32 flags;		/* BPF_FIB_LOOKUP_* */
	__u32 mark;		/* packet mark, with BPF_FIB_LOOKUP_MARK */
	__u32 tos;		/* IPv4 tos byte (IPv6: 0) */
	/* outputs */
	__s32 ret;		/* BPF_FIB_LKUP_RET_* */
	__u32 ifindex_out;
	__u32 mtu;
	__u8 smac[6];
	__u8 dmac[6];
	/* The neighbour the answer needs (the gateway, else the destination),
	 * set with NO_NEIGH too: the control plane asks the kernel to resolve
	 * it (routes/solicit.rs). Zero when the answer is of the other family
	 * (an IPv4 route via an IPv6 gateway).
	 */
	__be32 nh[4];
};

#endif
