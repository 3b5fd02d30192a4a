// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Benchmark helpers, not part of the product's fast path:
 * - bench_gen: traffic generator run with BPF_PROG_RUN and
 *   BPF_F_TEST_XDP_LIVE_FRAMES on a LAN host's interface; spreads packets
 *   over nflows source ports and transmits them (XDP_TX).
 * - floor_xdp / floor_tc: the lab's limit, a bare redirect with a MAC
 *   rewrite and no lookup, no NAT, no counters.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>
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
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct bench_cfg);
	__uint(max_entries, 1);
} bench_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
} bench_seq SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP_HASH);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 8);
} bench_ports SEC(".maps");

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
	__u64 *seq = bpf_map_lookup_elem(&bench_seq, &k);

	if (!c || !seq || (void *)(uh + 1) > data_end)
		return XDP_ABORTED;
	if (c->nflows > 1) {
		/* A zero UDP checksum is legal over IPv4, so the port can change
		 * without checksum work.
		 */
		uh->source = bpf_htons(c->base_port + (__u16)(*seq % c->nflows));
		uh->check = 0;
	}
	*seq += 1;
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
