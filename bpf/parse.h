/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Header parsing for the fast path. Mirrors the checks of
 * nf_flow_tuple_ip / nf_flow_tuple_ipv6 (net/netfilter/nf_flow_table_ip.c):
 * anything the kernel flowtable would not handle returns a slow-path reason.
 */
#ifndef FO_PARSE_H
#define FO_PARSE_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "flow.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
#define FO_IP_MF 0x2000
#define FO_IP_OFFSET 0x1fff
#define FO_ETH_P_8021AD 0x88A8
#define FO_ETH_P_PPP_SES 0x8864

/* Result of parsing: offsets are from the start of the frame. */
struct fo_parsed {
	struct fo_flow_key key;
	__u32 l3_off;
	__u32 l4_off;
	__u32 l3_len;		/* IPv4 tot_len / IPv6 40 + payload_len */
	__u32 l4_hdr_len;	/* TCP doff*4 or 8 */
	__u8 tcp_flags;		/* byte 13 of the TCP header */
};

#define FO_TCP_FIN 0x01
#define FO_TCP_SYN 0x02
#define FO_TCP_RST 0x04

/* Returns 0 when the packet is a fast-path candidate, else an fo_stat slow
 * reason. Never touches memory outside [data, data_end).
 */
static __always_inline int fo_parse(void *data, void *data_end, __u32 pkt_len, struct fo_parsed *p)
{
	struct ethhdr *eth = data;
	__u8 proto;

	if ((void *)(eth + 1) > data_end)
		return FO_SLOW_MALFORMED;
	if (eth->h_proto == bpf_htons(ETH_P_8021Q) || eth->h_proto == bpf_htons(FO_ETH_P_8021AD) ||
	    eth->h_proto == bpf_htons(FO_ETH_P_PPP_SES))
		return FO_SLOW_ENCAP;
	/* Broadcast and multicast frames are never forwarded flows. */
	if (eth->h_dest[0] & 1)
		return FO_SLOW_L2_NOT_HOST;

	p->l3_off = sizeof(*eth);
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *iph = (void *)(eth + 1);

		if ((void *)(iph + 1) > data_end)
			return FO_SLOW_MALFORMED;
		if (iph->version != 4 || iph->ihl < 5)
			return FO_SLOW_MALFORMED;
		if (iph->ihl != 5)
			return FO_SLOW_IP_OPTIONS;
		p->l3_len = bpf_ntohs(iph->tot_len);
		if (p->l3_len < sizeof(*iph) || p->l3_off + p->l3_len > pkt_len)
			return FO_SLOW_MALFORMED;
		if (iph->frag_off & bpf_htons(FO_IP_MF | FO_IP_OFFSET))
			return FO_SLOW_FRAGMENT;
		proto = iph->protocol;
		if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
			return FO_SLOW_NOT_TCP_UDP;
		if (iph->ttl <= 1)
			return FO_SLOW_TTL;
		p->key.family = AF_INET;
		p->key.saddr[0] = iph->saddr;
		p->key.daddr[0] = iph->daddr;
		p->l4_off = p->l3_off + sizeof(*iph);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return FO_SLOW_MALFORMED;
		if (ip6->version != 6)
			return FO_SLOW_MALFORMED;
		p->l3_len = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
		/* payload_len 0 is a jumbogram (hop-by-hop option) */
		if (ip6->payload_len == 0 || p->l3_off + p->l3_len > pkt_len)
			return FO_SLOW_MALFORMED;
		proto = ip6->nexthdr;
		if (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
			switch (proto) {
			case 0:		/* hop-by-hop */
			case 43:	/* routing */
			case 44:	/* fragment */
			case 50:	/* ESP */
			case 51:	/* AH */
			case 60:	/* destination options */
			case 135:	/* mobility */
			case 139:	/* HIP */
			case 140:	/* shim6 */
				return FO_SLOW_IPV6_EXT;
			}
			return FO_SLOW_NOT_TCP_UDP;
		}
		if (ip6->hop_limit <= 1)
			return FO_SLOW_TTL;
		p->key.family = AF_INET6;
		__builtin_memcpy(p->key.saddr, &ip6->saddr, 16);
		__builtin_memcpy(p->key.daddr, &ip6->daddr, 16);
		p->l4_off = p->l3_off + sizeof(*ip6);
	} else {
		return FO_SLOW_NOT_IP;
	}

	p->key.proto = proto;
	if (proto == IPPROTO_TCP) {
		struct tcphdr *th = data + p->l4_off;

		if ((void *)(th + 1) > data_end)
			return FO_SLOW_MALFORMED;
		p->l4_hdr_len = th->doff * 4;
		if (p->l4_hdr_len < sizeof(*th) || p->l4_off + p->l4_hdr_len > p->l3_off + p->l3_len)
			return FO_SLOW_MALFORMED;
		p->key.sport = th->source;
		p->key.dport = th->dest;
		p->tcp_flags = ((__u8 *)th)[13];
	} else {
		struct udphdr *uh = data + p->l4_off;

		if ((void *)(uh + 1) > data_end)
			return FO_SLOW_MALFORMED;
		if (p->l4_off + sizeof(*uh) > p->l3_off + p->l3_len)
			return FO_SLOW_MALFORMED;
		p->l4_hdr_len = sizeof(*uh);
		p->key.sport = uh->source;
		p->key.dport = uh->dest;
	}
	return 0;
}

#endif
