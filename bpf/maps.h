/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Maps of the fast path. Sizes are defaults; the control plane resizes
 * fo_flows before load from its configured table size.
 */
#ifndef FO_MAPS_H
#define FO_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "flow.h"

/* Offloaded flows, one entry per direction (like the kernel flowtable,
 * which inserts tuplehash[0] and [1]). Not preallocated: a preallocated
 * table costs every element of --max-flows at load (29 MiB at 65,536
 * connections, before one packet), where this costs its buckets (16 bytes
 * a slot) and an element per direction installed (htab_map_mem_usage in
 * kernel/bpf/hashtab.c: elem_size plus bpf_mem_alloc's 8-byte header).
 * Only the control plane inserts (a syscall, where bpf_mem_alloc may
 * refill its caches); the fast path writes its counters in place. The
 * price is ENOMEM on insert when the engine's memory cgroup is full,
 * which the engine reports as such and leaves the connection to the
 * kernel.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct fo_flow_key);
	__type(value, struct fo_flow);
	__uint(max_entries, 131072);
} fo_flows SEC(".maps");

/* Connections the control plane took off the fast path while conntrack
 * still considers them offloadable (idle, route change, link down; --iface
 * mode). Keyed by what a packet of theirs looks like when it LEAVES: the
 * tuple after NAT, interface 0 (flow::egress_key). TC egress
 * stamps the time when the kernel forwarded such a packet, so the control
 * plane re-offloads the connection only on evidence that the current
 * ruleset let one through (the role of the kernel's `flow add` rule; there
 * is no conntrack event for a packet of an established connection). A
 * packet the kernel drops never gets here.
 * Not preallocated: it costs its buckets (16 bytes each) plus an element
 * per key watched (htab_map_mem_usage), instead of a second full table
 * that usually stands empty. Only the control plane adds or removes keys
 * (the program writes the stamp in place), so no LRU (which the kernel
 * only has preallocated): a full table refuses the key and the engine
 * forgets that connection instead of parking it.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct fo_flow_key);
	__type(value, __u64);
	__uint(max_entries, 65536);
} fo_dormant SEC(".maps");

/* Whether fo_dormant holds any key (index 0: 1 or 0), set by the control
 * plane when that changes: TC egress skips parsing when it is zero, so an
 * engine with nothing dormant costs egress traffic (offloaded packets
 * included) one array load.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 1);
} fo_watching SEC(".maps");

/* enum fo_below by the ifindex of a managed device with a managed device
 * above it, set by the control plane (absent: FO_BELOW_NONE).
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 256);
} fo_watch_below SEC(".maps");

/* The first forwarded packet of a dormant connection (its fo_dormant stamp
 * was 0) sends its egress key here, so the control plane wakes it at once
 * instead of finding it on its next scan.
 */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} fo_wake SEC(".maps");

/* Offloaded directions that handed the kernel a RST they could not take
 * as a close (fo_rst_closes in fastpath.bpf.c), by key. Conntrack, liberal
 * and blind to the window while the connection is offloaded, keeps such a
 * RST's connection ESTABLISHED but shortens its timeout
 * (nf_conntrack_tcp_packet: to the unacknowledged timeout in 6.1 and
 * 6.12, to the close timeout in 6.18, measured), where the kernel without
 * offload, which sees the window, finds a blind RST out of window and
 * leaves the entry alone; and the packets that would have lengthened it
 * again take the fast path. The control plane puts the timeout back.
 */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} fo_rst SEC(".maps");

/* Per-CPU counters indexed by enum fo_stat. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, FO_STAT_MAX);
} fo_stats SEC(".maps");

/* Egress interfaces an XDP program may redirect to. */
struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP_HASH);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 256);
} fo_tx_ports SEC(".maps");

/* XDP ports whose frames may carry a partial L4 checksum (key: ifindex):
 * a veth whose peer sends with TX checksum offload on (CHECKSUM_PARTIAL
 * skbs from a local sender), set by the control plane from the peer's
 * features. A frame from a wire never does, so elsewhere a complete
 * checksum that happens to equal the pseudo-header sum is not mistaken for
 * one (fo_l4_csum_partial).
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, __u8);
	__uint(max_entries, 256);
} fo_csum_ports SEC(".maps");

static __always_inline void fo_count(__u32 idx, __u64 n)
{
	__u64 *c = bpf_map_lookup_elem(&fo_stats, &idx);

	if (c)
		*c += n;
}

#endif
