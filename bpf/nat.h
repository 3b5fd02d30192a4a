/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Packet rewrite for a matched flow: NAT of addresses and ports, TTL / hop
 * limit decrement (the link-layer header is encap.h's). Mirrors nf_flow_snat_ip / nf_flow_dnat_ip /
 * nf_flow_nat_port (net/netfilter/nf_flow_table_ip.c), with the checksum
 * differences precomputed by the control plane.
 */
#ifndef FO_NAT_H
#define FO_NAT_H

#include "csum.h"
#include "parse.h"

/* Where the L4 checksum lives and what still has to be applied to it.
 * XDP applies it directly; TC applies it with bpf_l4_csum_replace so
 * CHECKSUM_PARTIAL and CHECKSUM_COMPLETE skbs stay right.
 */
struct fo_l4_fix {
	__u32 csum_off;
	__u32 pseudo;
	__u32 ports;
	__u8 udp;
	__u8 ipv6;
};

/* The IP header is now at l3_off (the link-layer header may have changed
 * size since parsing). Returns 0, or -1 if the headers are not where
 * parsing found them (cannot happen after fo_parse; the checks keep the
 * verifier and us honest). If apply_l4 is false, the L4 checksum is left
 * for the caller (fix).
 */
static __always_inline int fo_rewrite(void *data, void *data_end, __u32 l3_off, const struct fo_parsed *p,
				      const struct fo_flow *f, bool apply_l4, struct fo_l4_fix *fix)
{
	__u32 l4_off;

	if (l3_off > 64)
		return -1;
	if (p->key.family == AF_INET) {
		struct iphdr *iph = data + l3_off;

		if ((void *)(iph + 1) > data_end)
			return -1;
		iph->saddr = f->new_saddr[0];
		iph->daddr = f->new_daddr[0];
		iph->ttl--;
		iph->check = csum_apply(iph->check, f->csum_l3 + csum_ttl_dec_diff());
		l4_off = l3_off + sizeof(*iph);
		fix->ipv6 = 0;
	} else {
		struct ipv6hdr *ip6 = data + l3_off;

		if ((void *)(ip6 + 1) > data_end)
			return -1;
		__builtin_memcpy(&ip6->saddr, f->new_saddr, 16);
		__builtin_memcpy(&ip6->daddr, f->new_daddr, 16);
		ip6->hop_limit--;
		l4_off = l3_off + sizeof(*ip6);
		fix->ipv6 = 1;
	}

	fix->pseudo = f->csum_l4_pseudo;
	fix->ports = f->csum_l4_ports;
	if (p->key.proto == IPPROTO_TCP) {
		struct tcphdr *th = data + l4_off;

		if ((void *)(th + 1) > data_end)
			return -1;
		th->source = f->new_sport;
		th->dest = f->new_dport;
		fix->csum_off = l4_off + __builtin_offsetof(struct tcphdr, check);
		fix->udp = 0;
		if (apply_l4)
			th->check = csum_apply(th->check, fix->pseudo + fix->ports);
	} else {
		struct udphdr *uh = data + l4_off;

		if ((void *)(uh + 1) > data_end)
			return -1;
		uh->source = f->new_sport;
		uh->dest = f->new_dport;
		fix->csum_off = l4_off + __builtin_offsetof(struct udphdr, check);
		fix->udp = 1;
		/* A zero UDP checksum means "none" and stays zero; a computed
		 * zero is sent as 0xffff (CSUM_MANGLED_0), as nf_flow_nat_port_udp.
		 */
		if (apply_l4 && uh->check) {
			__u16 c = csum_apply(uh->check, fix->pseudo + fix->ports);

			uh->check = c ? c : 0xffff;
		}
	}
	return 0;
}

#endif
