/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Encapsulation between Ethernet and IP: 802.1Q / 802.1ad tags and PPPoE
 * session headers. Parsing builds the key's encap[] as nf_flow_tuple_encap
 * does (net/netfilter/nf_flow_table_ip.c: a tag in skb metadata first, then
 * the in-band headers, outermost first); the writers build the headers of
 * fo_flow.out_encap on egress, as the VLAN and PPPoE devices would
 * (vlan_dev_hard_start_xmit, pppoe_xmit).
 */
#ifndef FO_ENCAP_H
#define FO_ENCAP_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <stdbool.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "flow.h"

#ifndef AF_INET
#define AF_INET 2
#endif

#define FO_ETH_P_8021AD 0x88A8
#define FO_ETH_P_PPP_SES 0x8864
#define FO_PPP_IP 0x0021
#define FO_PPP_IPV6 0x0057
#define FO_VLAN_VID_MASK 0x0fff
#define FO_VLAN_HLEN 4
#define FO_PPPOE_HLEN 8	/* PPPoE session header + PPP protocol */

/* include/linux/if_vlan.h struct vlan_hdr */
struct fo_vlan_hdr {
	__be16 tci;
	__be16 inner_proto;
};

/* include/uapi/linux/if_pppox.h struct pppoe_hdr, plus the PPP protocol
 * field that follows it (what nf_flow_pppoe_proto reads).
 */
struct fo_pppoe_hdr {
	__u8 ver_type;	/* version 1, type 1 */
	__u8 code;	/* 0: session data */
	__be16 sid;
	__be16 length;	/* PPP payload, protocol field included */
	__be16 ppp_proto;
};

static __always_inline bool fo_is_vlan(__be16 proto)
{
	return proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(FO_ETH_P_8021AD);
}

/* Append one header to key->encap; more than FO_ENCAP_MAX is encapsulation
 * the fast path does not handle (nf_flow_tuple_encap stops at
 * NF_FLOW_TABLE_ENCAP_MAX too).
 */
static __always_inline int fo_encap_add(struct fo_flow_key *key, __be16 proto, __u16 id)
{
	if (key->encap_num == 0) {
		key->encap[0].proto = proto;
		key->encap[0].id = id;
	} else if (key->encap_num == 1) {
		key->encap[1].proto = proto;
		key->encap[1].id = id;
	} else {
		return FO_SLOW_ENCAP;
	}
	key->encap_num++;
	return 0;
}

/* Where the encapsulation of a frame ends. */
struct fo_l2 {
	__u32 l3_off;		/* first byte of the IP header */
	__be16 l3_proto;	/* ETH_P_IP or ETH_P_IPV6 (or what else it is) */
	__u16 pppoe_len;	/* PPPoE length field; 0 without PPPoE */
};

/* Parse the Ethernet header and up to FO_ENCAP_MAX in-band headers after
 * the metadata tag (already in key->encap when the skb had one). The key
 * holds the VLAN id only (12 bits): the kernel's tuple takes the whole TCI
 * (nf_flow_tuple_encap: skb_vlan_tag_get, veth->h_vlan_TCI) while the path
 * it matches against holds the VLAN device's id (dev_fill_forward_path), so
 * there a frame with priority bits set misses the flowtable; the VLAN
 * device itself demultiplexes on the id (vlan_do_receive), as we do.
 * A PPPoE header is the innermost (PPP, not an ethertype, follows it);
 * nf_flow_pppoe_proto maps its PPP protocol to IPv4 / IPv6.
 */
static __always_inline int fo_parse_encap(void *data, void *data_end, __u32 pkt_len, struct fo_flow_key *key,
					  struct fo_l2 *l2)
{
	struct ethhdr *eth = data;
	__u32 off = sizeof(*eth);
	__be16 proto;
	int i;

	if ((void *)(eth + 1) > data_end)
		return FO_SLOW_MALFORMED;
	/* Broadcast and multicast frames are never forwarded flows. */
	if (eth->h_dest[0] & 1)
		return FO_SLOW_L2_NOT_HOST;
	proto = eth->h_proto;
#pragma unroll
	for (i = 0; i < FO_ENCAP_MAX; i++) {
		if (fo_is_vlan(proto)) {
			struct fo_vlan_hdr *v = data + off;

			if ((void *)(v + 1) > data_end)
				return FO_SLOW_MALFORMED;
			if (fo_encap_add(key, proto, bpf_ntohs(v->tci) & FO_VLAN_VID_MASK))
				return FO_SLOW_ENCAP;
			proto = v->inner_proto;
			off += sizeof(*v);
		} else if (proto == bpf_htons(FO_ETH_P_PPP_SES)) {
			struct fo_pppoe_hdr *ph = data + off;
			__u16 len;

			if ((void *)(ph + 1) > data_end)
				return FO_SLOW_MALFORMED;
			/* Session data only (pppoe_rcv); discovery is 0x8863. */
			if (ph->ver_type != 0x11 || ph->code != 0)
				return FO_SLOW_MALFORMED;
			len = bpf_ntohs(ph->length);
			/* pppoe_rcv drops a frame shorter than its length */
			if (len < 2 || off + 6 + len > pkt_len)
				return FO_SLOW_MALFORMED;
			/* LCP, IPCP, ... are the ppp daemon's */
			if (ph->ppp_proto == bpf_htons(FO_PPP_IP))
				proto = bpf_htons(ETH_P_IP);
			else if (ph->ppp_proto == bpf_htons(FO_PPP_IPV6))
				proto = bpf_htons(ETH_P_IPV6);
			else
				return FO_SLOW_NOT_IP;
			if (fo_encap_add(key, bpf_htons(FO_ETH_P_PPP_SES), bpf_ntohs(ph->sid)))
				return FO_SLOW_ENCAP;
			l2->pppoe_len = len;
			off += sizeof(*ph);
			break;
		} else {
			break;
		}
	}
	if (fo_is_vlan(proto) || proto == bpf_htons(FO_ETH_P_PPP_SES))
		return FO_SLOW_ENCAP;
	l2->l3_off = off;
	l2->l3_proto = proto;
	return 0;
}

/* What fo_flow.out_encap asks for: tags (outermost first) and at most one
 * PPPoE header, innermost. */
struct fo_out_encap {
	__u8 vlans;
	__u8 pppoe;
	__u8 l2_len;		/* Ethernet header + all of them */
};

/* 0, or FO_SLOW_ENCAP when the entry asks for something this file cannot
 * build (a mistake of the control plane: never guessed at).
 */
static __always_inline int fo_out_encap_one(__be16 proto, struct fo_out_encap *o)
{
	if (o->pppoe)
		return FO_SLOW_ENCAP;
	if (fo_is_vlan(proto))
		o->vlans++;
	else if (proto == bpf_htons(FO_ETH_P_PPP_SES))
		o->pppoe = 1;
	else
		return FO_SLOW_ENCAP;
	return 0;
}

static __always_inline int fo_out_encap(const struct fo_flow *f, struct fo_out_encap *o)
{
	__u8 n = f->out_encap_num;

	o->vlans = 0;
	o->pppoe = 0;
	if (n > FO_ENCAP_MAX || (n && (f->flags & FO_F_L3_OUT)))
		return FO_SLOW_ENCAP;
	if (n > 0 && fo_out_encap_one(f->out_encap[0].proto, o))
		return FO_SLOW_ENCAP;
	if (n > 1 && fo_out_encap_one(f->out_encap[1].proto, o))
		return FO_SLOW_ENCAP;
	o->l2_len = sizeof(struct ethhdr) + o->vlans * FO_VLAN_HLEN + o->pppoe * FO_PPPOE_HLEN;
	return 0;
}

static __always_inline __be16 fo_l3_ethertype(__u8 family)
{
	return family == AF_INET ? bpf_htons(ETH_P_IP) : bpf_htons(ETH_P_IPV6);
}

/* PPPoE session header for an IP packet of l3_len bytes (pppoe_xmit). */
static __always_inline void fo_write_pppoe(struct fo_pppoe_hdr *ph, __u16 sid, __u8 family, __u32 l3_len)
{
	ph->ver_type = 0x11;
	ph->code = 0;
	ph->sid = bpf_htons(sid);
	ph->length = bpf_htons(l3_len + 2);
	ph->ppp_proto = family == AF_INET ? bpf_htons(FO_PPP_IP) : bpf_htons(FO_PPP_IPV6);
}

/* The TCI of pushed tag i (0: outermost) for a packet of skb->priority
 * prio (0, 2, 4 or 6: fo_priority): the id, and the PCP the VLAN device's
 * egress QoS map gives prio (vlan_dev_get_egress_qos_mask), as the control
 * plane put it in fo_flow.out_pcp.
 */
static __always_inline __u16 fo_tci(const struct fo_flow *f, int i, __u32 prio)
{
	__u16 pcp = (f->out_pcp[i] >> (3 * ((prio >> 1) & 3))) & 7;

	return (f->out_encap[i].id & FO_VLAN_VID_MASK) | (pcp << 13);
}

/* Write the whole egress L2 header in place (XDP: the room is already
 * there, l2_len bytes before the IP header): MACs, tags, PPPoE. Returns 0,
 * or -1 if the room is not in the packet (cannot happen after the head
 * adjustment; keeps the verifier and us honest).
 */
static __always_inline int fo_write_l2(void *data, void *data_end, const struct fo_flow *f,
				       const struct fo_out_encap *o, __u8 family, __u32 l3_len, __u32 prio)
{
	struct ethhdr *eth = data;
	struct fo_vlan_hdr *v = (void *)(eth + 1);
	__be16 inner = o->pppoe ? bpf_htons(FO_ETH_P_PPP_SES) : fo_l3_ethertype(family);

	if ((void *)(eth + 1) > data_end)
		return -1;
	__builtin_memcpy(eth->h_dest, f->dmac, 6);
	__builtin_memcpy(eth->h_source, f->smac, 6);
	eth->h_proto = o->vlans ? f->out_encap[0].proto : inner;
	if (o->vlans) {
		if ((void *)(v + 1) > data_end)
			return -1;
		v->tci = bpf_htons(fo_tci(f, 0, prio));
		v->inner_proto = o->vlans > 1 ? f->out_encap[1].proto : inner;
		v++;
	}
	if (o->vlans > 1) {
		if ((void *)(v + 1) > data_end)
			return -1;
		v->tci = bpf_htons(fo_tci(f, 1, prio));
		v->inner_proto = inner;
		v++;
	}
	if (o->pppoe) {
		struct fo_pppoe_hdr *ph = (void *)v;

		if ((void *)(ph + 1) > data_end)
			return -1;
		fo_write_pppoe(ph, f->out_encap[o->vlans & 1].id, family, l3_len);
	}
	return 0;
}

/* TC's link-layer change, through the kernel's helpers so the skb's
 * metadata stays right: tags off with bpf_skb_vlan_pop (skb_vlan_pop
 * clears a metadata tag, removes an in-band one and moves the next one
 * into metadata), room for PPPoE with bpf_skb_adjust_room (an IP skb after
 * the pops) or bpf_skb_change_head (from an L3 device), tags on with
 * bpf_skb_vlan_push, innermost first (skb_vlan_push moves the tag already
 * in metadata into the frame and puts the new, outer one in metadata, as a
 * VLAN device's xmit leaves it). Towards an L3 device nothing is written:
 * the redirect pulls everything up to the network header
 * (__bpf_redirect_no_mac in net/core/filter.c).
 * in_tags: the ingress tags (the caller sends PPPoE ingress to the slow
 * path). Returns 0 with the new IP header offset, 1 if it failed with the frame
 * unchanged, -1 if it failed after changing it.
 */
static __always_inline int fo_tc_l2(struct __sk_buff *skb, __u8 in_tags, __u8 family, __u32 l3_len,
				    const struct fo_flow *f, const struct fo_out_encap *o, const bool l3dev,
				    __u32 prio, __u32 *l3_off)
{
	void *data, *data_end;
	struct ethhdr *eth;
	bool changed = false;

	if (!l3dev && in_tags > 0) {
		if (bpf_skb_vlan_pop(skb))
			return 1;
		changed = true;
		if (in_tags > 1 && bpf_skb_vlan_pop(skb))
			return -1;
	}
	if (f->flags & FO_F_L3_OUT) {
		*l3_off = l3dev ? 0 : sizeof(struct ethhdr);
		return 0;
	}
	if (l3dev) {
		if (bpf_skb_change_head(skb, sizeof(struct ethhdr) + o->pppoe * FO_PPPOE_HLEN, 0))
			return 1;
		changed = true;
	} else if (o->pppoe) {
		if (bpf_skb_adjust_room(skb, FO_PPPOE_HLEN, BPF_ADJ_ROOM_MAC, 0))
			return changed ? -1 : 1;
		changed = true;
	}
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return changed ? -1 : 1;
	if (o->pppoe) {
		struct fo_pppoe_hdr *ph = (void *)(eth + 1);

		if ((void *)(ph + 1) > data_end)
			return -1;
		eth->h_proto = bpf_htons(FO_ETH_P_PPP_SES);
		fo_write_pppoe(ph, f->out_encap[o->vlans & 1].id, family, l3_len);
	} else {
		eth->h_proto = fo_l3_ethertype(family);
	}
	if (o->vlans > 1 && bpf_skb_vlan_push(skb, f->out_encap[1].proto, fo_tci(f, 1, prio)))
		return changed ? -1 : 1;
	if (o->vlans > 1)
		changed = true;
	if (o->vlans > 0 && bpf_skb_vlan_push(skb, f->out_encap[0].proto, fo_tci(f, 0, prio)))
		return changed ? -1 : 1;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return -1;
	__builtin_memcpy(eth->h_dest, f->dmac, 6);
	__builtin_memcpy(eth->h_source, f->smac, 6);
	*l3_off = sizeof(*eth) + (o->vlans ? o->vlans - 1 : 0) * FO_VLAN_HLEN + o->pppoe * FO_PPPOE_HLEN;
	return 0;
}

#endif
