// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Benchmark helpers, not part of the product's fast path:
 * - bench_gen: traffic generator run with BPF_PROG_RUN and
 *   BPF_F_TEST_XDP_LIVE_FRAMES on a LAN host's interface; writes the
 *   frame's headers afresh, spreads packets over nflows source ports and
 *   transmits them (XDP_TX).
 *   Past FLOWS_PER_DPORT flows it also spreads them over destination ports.
 * - floor_xdp / floor_tc: the lab's limit, a bare redirect with a MAC
 *   rewrite and no lookup, no NAT, no counters.
 * - lat_pre / lat_post: timestamps of TCP packets at the router's ingress,
 *   first and last in the TCX chain around the offload engine's program
 *   (which redirects fast-pathed packets, so only slow-path packets reach
 *   lat_post). The benchmark derives the offload latency from these.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct bench_cfg {
	__u32 out_ifindex;
	__u32 nflows;
	__u16 base_port;
	__u8 smac[6];
	__u8 dmac[6];
	__u16 pad;
	/* lat_pre/lat_post: client ports [lat_lo, lat_hi], client side ifindex */
	__u16 lat_lo;
	__u16 lat_hi;
	__u32 lan_ifindex;
	/* bench_gen: frames go in groups of `burst` back to back, a group at
	 * least burst * gap_ns after the one before, frames in between dropped
	 * (gap_ns 0: no pacing, every frame sent)
	 */
	__u32 gap_ns;
	__u32 burst;
};

/* Client source ports per destination port when the generator spreads
 * flows over more than one (UDP ports are 16 bits).
 */
#define FLOWS_PER_DPORT 50000

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct bench_cfg);
	__uint(max_entries, 1);
} bench_cfg SEC(".maps");

struct gen_state {
	__u64 seq;
	/* when the next group is due (gap_ns pacing), frames left in this one */
	__u64 due_ns;
	__u32 left;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct gen_state);
	__uint(max_entries, 1);
} bench_seq SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP_HASH);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 8);
} bench_ports SEC(".maps");

/* Ethernet + IPv4 (no options) + UDP headers of the generator's frame. */
#define BENCH_HDR_LEN (sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct udphdr))

struct bench_hdr {
	__u8 b[BENCH_HDR_LEN];
};

/* The headers bench_gen writes into every frame, set by the benchmark for
 * each run (its destination port included).
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct bench_hdr);
	__uint(max_entries, 1);
} bench_frame SEC(".maps");

SEC("xdp")
int bench_gen(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = (void *)(eth + 1);
	struct udphdr *uh = (void *)(iph + 1);
	__u32 k = 0;
	struct bench_cfg *c = bpf_map_lookup_elem(&bench_cfg, &k);
	struct gen_state *st = bpf_map_lookup_elem(&bench_seq, &k);
	struct bench_hdr *h = bpf_map_lookup_elem(&bench_frame, &k);

	if (!c || !st || !h || (void *)(uh + 1) > data_end)
		return XDP_ABORTED;
	if (c->gap_ns && c->burst) {
		/* Pace by dropping what is over the rate, not by waiting: the test
		 * run holds bottom halves off for each batch of frames, so a wait
		 * here would keep the WAN host's NAPI thread (same CPU) from
		 * running. A group of `burst` frames is due every burst * gap_ns;
		 * a run that starts late (after a pause) starts at once.
		 */
		if (!st->left) {
			__u64 now = bpf_ktime_get_ns();

			if (now < st->due_ns)
				return XDP_DROP;
			if (st->due_ns + 1000000 < now)
				st->due_ns = now;
			st->due_ns += (__u64)c->gap_ns * c->burst;
			st->left = c->burst;
		}
		st->left--;
	}
	/* Live-frames pages are recycled with their content as it was left
	 * (Documentation/bpf/bpf_prog_run.rst), and a frame's page comes back
	 * from the router and the sink rewritten: MACs, NAT'd source, TTL,
	 * checksum. Resent as is, the router would get frames for another MAC
	 * and other flows, which it drops after paying for them, on every
	 * path that rewrites more than the floors do. So every frame starts
	 * from the run's headers.
	 */
	__builtin_memcpy(data, h->b, BENCH_HDR_LEN);
	if (c->nflows > 1) {
		/* A zero UDP checksum is legal over IPv4, so the port can change
		 * without checksum work.
		 */
		__u32 i = st->seq % c->nflows;

		uh->source = bpf_htons(c->base_port + (__u16)(i % FLOWS_PER_DPORT));
		if (i >= FLOWS_PER_DPORT)
			uh->dest = bpf_htons(bpf_ntohs(uh->dest) + (__u16)(i / FLOWS_PER_DPORT));
		uh->check = 0;
	}
	st->seq += 1;
	return XDP_TX;
}

static __always_inline int floor_rewrite(void *data, void *data_end, struct bench_cfg **cfg)
{
	struct ethhdr *eth = data;
	__u32 k = 0;
	struct bench_cfg *c = bpf_map_lookup_elem(&bench_cfg, &k);

	if (!c || (void *)(eth + 1) > data_end)
		return -1;
	__builtin_memcpy(eth->h_dest, c->dmac, 6);
	__builtin_memcpy(eth->h_source, c->smac, 6);
	*cfg = c;
	return 0;
}

SEC("xdp")
int floor_xdp(struct xdp_md *ctx)
{
	struct bench_cfg *c;

	if (floor_rewrite((void *)(long)ctx->data, (void *)(long)ctx->data_end, &c))
		return XDP_PASS;
	return bpf_redirect_map(&bench_ports, c->out_ifindex, XDP_PASS);
}

SEC("tcx/ingress")
int floor_tc(struct __sk_buff *skb)
{
	struct bench_cfg *c;

	if (floor_rewrite((void *)(long)skb->data, (void *)(long)skb->data_end, &c))
		return TC_ACT_UNSPEC;
	return bpf_redirect(c->out_ifindex, 0);
}

/* One TCP packet at the router's ingress: kind 0 from lat_pre (every
 * packet), 1 from lat_post (the same packet, on the slow path).
 */
struct lat_event {
	__u64 ts_ns;
	__u32 id;
	__u32 len;
	__u16 port;
	__u8 dir;
	__u8 kind;
	__u8 tcp_flags;
	__u8 pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 16 << 20);
} lat_events SEC(".maps");

/* The packet lat_pre saw last on this CPU. TCX runs one packet's chain to
 * the end on one CPU with bottom halves off (tcx_run), so lat_post on this
 * CPU sees the same packet.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct lat_event);
	__uint(max_entries, 1);
} lat_cur SEC(".maps");

SEC("tcx/ingress")
int lat_pre(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = (void *)(eth + 1);
	struct tcphdr *th = (void *)(iph + 1);
	__u32 k = 0;
	struct bench_cfg *c = bpf_map_lookup_elem(&bench_cfg, &k);
	struct lat_event *cur = bpf_map_lookup_elem(&lat_cur, &k);
	__u16 port;
	__u8 dir;

	if (!c || !cur)
		return TC_ACT_UNSPEC;
	cur->kind = 0xff;
	/* options-free IPv4 headers only: the benchmark's own traffic */
	if ((void *)(th + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) || iph->ihl != 5 ||
	    iph->protocol != IPPROTO_TCP)
		return TC_ACT_UNSPEC;
	dir = skb->ingress_ifindex == c->lan_ifindex ? 0 : 1;
	port = bpf_ntohs(dir == 0 ? th->source : th->dest);
	if (port < c->lat_lo || port > c->lat_hi)
		return TC_ACT_UNSPEC;
	cur->ts_ns = bpf_ktime_get_ns();
	/* unique across CPUs: the CPU in the top byte, a per-CPU count below */
	cur->id = (bpf_get_smp_processor_id() << 24) | ((cur->id + 1) & 0xffffff);
	cur->len = skb->len;
	cur->port = port;
	cur->dir = dir;
	cur->kind = 0;
	cur->tcp_flags = ((__u8 *)th)[13];
	bpf_ringbuf_output(&lat_events, cur, sizeof(*cur), 0);
	return TC_ACT_UNSPEC;
}

SEC("tcx/ingress")
int lat_post(struct __sk_buff *skb)
{
	__u32 k = 0;
	struct lat_event *cur = bpf_map_lookup_elem(&lat_cur, &k);

	if (!cur || cur->kind != 0)
		return TC_ACT_UNSPEC;
	cur->kind = 1;
	cur->ts_ns = bpf_ktime_get_ns();
	bpf_ringbuf_output(&lat_events, cur, sizeof(*cur), 0);
	return TC_ACT_UNSPEC;
}
