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
#include "encap.h"
#define FO_IP_MF 0x2000
#define FO_IP_OFFSET 0x1fff

/* Result of parsing: offsets are from the start of the frame. */
struct fo_parsed {
	struct fo_flow_key key;
	__u32 l3_off;
	__u32 l4_off;
	__u32 l3_len;		/* IPv4 tot_len / IPv6 40 + payload_len */
	__u32 l4_hdr_len;	/* TCP doff*4 or 8 */
	__u8 tcp_flags;		/* byte 13 of the TCP header */
	__u8 tos;		/* IPv4 TOS byte (IPv6: 0) */
	__u16 pppoe_len;	/* PPPoE length field; 0 without PPPoE */
};

/* skb fields the parser and worker need; zero for XDP. */
struct fo_meta {
	__u32 ifindex;
	__u32 pkt_len;	/* bytes from the first header to the end */
	__u32 gso_segs;
	__u32 gso_size;
	__u32 pkt_type;
	__u32 vlan_present;
	__be16 vlan_proto;
	__u16 vlan_tci;
	__be16 protocol;	/* skb->protocol: the family on an L3 device */
};

#define FO_TCP_FIN 0x01
#define FO_TCP_SYN 0x02
#define FO_TCP_RST 0x04
#define FO_TCP_ACK 0x10

/* The IP and L4 headers at p->l3_off, of ethertype l3_proto. Returns 0
 * when the packet is a fast-path candidate, else an fo_stat slow reason.
 * Never touches memory outside [data, data_end).
 */
static __always_inline int fo_parse_l3(void *data, void *data_end, __u32 pkt_len, __be16 l3_proto,
				       struct fo_parsed *p)
{
	__u8 proto;

	/* keeps every offset below provably small for the verifier */
	if (p->l3_off > 64)
		return FO_SLOW_ENCAP;
	if (l3_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *iph = data + p->l3_off;

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
		p->tos = iph->tos;
		p->key.saddr[0] = iph->saddr;
		p->key.daddr[0] = iph->daddr;
		p->l4_off = p->l3_off + sizeof(*iph);
	} else if (l3_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + p->l3_off;

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

/* The whole frame. On an L3 device (l3dev: no link-layer header; ppp,
 * WireGuard, tun) the IP header comes first and skb->protocol names it;
 * elsewhere after Ethernet and its encapsulation, a tag in skb metadata
 * counting as the outermost (nf_flow_tuple_encap).
 */
static __always_inline int fo_parse(void *data, void *data_end, const struct fo_meta *m, const bool l3dev,
				    struct fo_parsed *p)
{
	struct fo_l2 l2 = {};
	int reason;

	if (l3dev) {
		p->l3_off = 0;
		return fo_parse_l3(data, data_end, m->pkt_len, m->protocol, p);
	}
	if (m->vlan_present)
		fo_encap_add(&p->key, m->vlan_proto, m->vlan_tci & FO_VLAN_VID_MASK);
	reason = fo_parse_encap(data, data_end, m->pkt_len, &p->key, &l2);
	if (reason)
		return reason;
	p->l3_off = l2.l3_off;
	reason = fo_parse_l3(data, data_end, m->pkt_len, l2.l3_proto, p);
	if (reason)
		return reason;
	/* pppoe_rcv trims the frame to this length; a different one is not a
	 * frame we would rebuild the same way.
	 */
	if (l2.pppoe_len && l2.pppoe_len != p->l3_len + 2)
		return FO_SLOW_MALFORMED;
	p->pppoe_len = l2.pppoe_len;
	return 0;
}

#endif
