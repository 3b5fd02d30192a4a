//! nf_tables base chains on a device's ingress or egress hook, from one
//! NFT_MSG_GETCHAIN dump over nfnetlink.
//!
//! Read from the kernel, not from `nft -j`: nft 1.0.6's JSON leaves the
//! devices out of a netdev chain (`{"chain": {..., "hook": "ingress"}}`),
//! which is the one fact needed here. Layouts:
//! include/uapi/linux/netfilter/nf_tables.h (NFTA_CHAIN_*, NFTA_HOOK_*).

use anyhow::{anyhow, bail, Result};

use crate::conntrack::nla::{NlHeader, NLM_F_REQUEST};
use crate::conntrack::nla::{NlMsgBuilder, NlMsgIter, NlaIter, NFGENMSG_LEN, NLMSG_DONE, NLMSG_ERROR, NLM_F_DUMP};
use crate::routes::dump::exchange_on;

/// NFNL_SUBSYS_NFTABLES (include/uapi/linux/netfilter/nfnetlink.h).
pub const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;

const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_HOOK_DEV: u16 = 3;
const NFTA_HOOK_DEVS: u16 = 4;

/// NFPROTO_INET / NFPROTO_NETDEV (include/uapi/linux/netfilter.h).
const NFPROTO_INET: u8 = 1;
const NFPROTO_NETDEV: u8 = 5;
const NFPROTO_BRIDGE: u8 = 7;
/// The bridge family's hooks a routed frame meets (include/uapi/linux/
/// netfilter_bridge.h): arriving on a port, NF_BR_PRE_ROUTING and
/// NF_BR_LOCAL_IN on its way up to the bridge device (br_handle_frame,
/// br_pass_frame_up); leaving by the bridge device, NF_BR_LOCAL_OUT and
/// NF_BR_POST_ROUTING (br_dev_xmit -> br_forward -> __br_forward).
/// NF_BR_FORWARD (2) sees bridged frames only.
const NF_BR_PRE_ROUTING: u32 = 0;
const NF_BR_LOCAL_IN: u32 = 1;
const NF_BR_LOCAL_OUT: u32 = 3;
const NF_BR_POST_ROUTING: u32 = 4;
/// NF_NETDEV_INGRESS / NF_NETDEV_EGRESS, and NF_INET_INGRESS (5), the inet
/// family's ingress hook, which registers at the device's netdev ingress
/// (nf_tables_chain_hook in net/netfilter/nf_tables_api.c).
const NF_NETDEV_INGRESS: u32 = 0;
const NF_NETDEV_EGRESS: u32 = 1;
const NF_INET_INGRESS: u32 = 5;

const DUMP_SEQ: u32 = 0x6e66;

/// Which device hook a chain is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Side {
    Ingress,
    Egress,
}

/// A base chain on a device hook.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeviceChain {
    /// "netdev", "inet" or "bridge" (a bridge chain is on every bridge,
    /// with no devices: the fast path on a bridge port skips it).
    pub family: &'static str,
    pub table: String,
    pub name: String,
    pub side: Side,
    pub priority: i32,
    /// The devices it is registered for (`device` or `devices = { .. }`).
    pub devices: Vec<String>,
}

impl DeviceChain {
    /// `netdev t c`, as `nft list chain` names it.
    pub fn label(&self) -> String {
        format!("{} {} {}", self.family, self.table, self.name)
    }
}

/// Every base chain on a device hook, in every table of this namespace.
pub fn device_chains() -> Result<Vec<DeviceChain>> {
    let mut req =
        NlMsgBuilder::new((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETCHAIN, NLM_F_REQUEST | NLM_F_DUMP, DUMP_SEQ);
    // AF_UNSPEC: every family.
    req.nfgenmsg(0, 0);
    let req = req.finish();
    let mut out = Vec::new();
    exchange_on(netlink_sys::protocols::NETLINK_NETFILTER, &req, |d| absorb(d, &mut out))
        .map_err(|e| anyhow!("nf_tables chain dump: {e:#}"))?;
    Ok(out)
}

/// Take one datagram of the dump; true when it is done.
fn absorb(datagram: &[u8], out: &mut Vec<DeviceChain>) -> Result<bool> {
    for m in NlMsgIter::new(datagram) {
        let (h, payload): (NlHeader, &[u8]) = m.map_err(|e| anyhow!("{e}"))?;
        if h.seq != DUMP_SEQ {
            continue;
        }
        match h.msg_type {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let code = payload.get(..4).map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]])).unwrap_or(-1);
                // A kernel without nf_tables answers a request to the
                // subsystem with EINVAL (nfnetlink_rcv_msg: no subsystem
                // after request_module): no table, so no chain. Our request
                // is otherwise valid (the netns check test sends it).
                if code != 0 && code != -libc::EINVAL {
                    bail!("{}", std::io::Error::from_raw_os_error(-code));
                }
                return Ok(true);
            }
            t if t == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWCHAIN => {
                if let Some(c) = parse_chain(payload)? {
                    out.push(c);
                }
            }
            _ => {}
        }
    }
    Ok(false)
}

/// One NFT_MSG_NEWCHAIN payload (nfgenmsg + attributes): the chain if it
/// is a base chain on a device hook, None for any other chain.
pub fn parse_chain(payload: &[u8]) -> Result<Option<DeviceChain>> {
    let family = match payload.first() {
        Some(&NFPROTO_NETDEV) => "netdev",
        Some(&NFPROTO_INET) => "inet",
        Some(&NFPROTO_BRIDGE) => "bridge",
        Some(_) => return Ok(None),
        None => bail!("chain message without its nfgenmsg"),
    };
    let attrs = payload.get(NFGENMSG_LEN..).ok_or_else(|| anyhow!("chain message without its nfgenmsg"))?;
    let (mut table, mut name, mut hook) = (None, None, None);
    for a in NlaIter::new(attrs) {
        let a = a.map_err(|e| anyhow!("chain message: {e}"))?;
        match a.kind {
            NFTA_CHAIN_TABLE => table = Some(c_string(a.payload)),
            NFTA_CHAIN_NAME => name = Some(c_string(a.payload)),
            NFTA_CHAIN_HOOK => hook = Some(parse_hook(a.payload)?),
            _ => {}
        }
    }
    // No hook: a regular chain (jump target), which runs only from a base one.
    let Some((num, priority, devices)) = hook else { return Ok(None) };
    let side = match (family, num) {
        ("netdev", NF_NETDEV_INGRESS) | ("inet", NF_INET_INGRESS) => Side::Ingress,
        ("netdev", NF_NETDEV_EGRESS) => Side::Egress,
        ("bridge", NF_BR_PRE_ROUTING | NF_BR_LOCAL_IN) => Side::Ingress,
        ("bridge", NF_BR_LOCAL_OUT | NF_BR_POST_ROUTING) => Side::Egress,
        _ => return Ok(None),
    };
    let missing = |what: &str| anyhow!("device chain message without its {what}");
    Ok(Some(DeviceChain {
        family,
        table: table.ok_or_else(|| missing("table"))?,
        name: name.ok_or_else(|| missing("name"))?,
        side,
        priority,
        devices,
    }))
}

fn parse_hook(b: &[u8]) -> Result<(u32, i32, Vec<String>)> {
    let (mut num, mut prio, mut devs) = (None, 0i32, Vec::new());
    for a in NlaIter::new(b) {
        let a = a.map_err(|e| anyhow!("chain hook: {e}"))?;
        match a.kind {
            NFTA_HOOK_HOOKNUM => num = Some(a.get_be32().map_err(|e| anyhow!("{e}"))?),
            NFTA_HOOK_PRIORITY => prio = a.get_be32().map_err(|e| anyhow!("{e}"))? as i32,
            NFTA_HOOK_DEV => devs.push(c_string(a.payload)),
            NFTA_HOOK_DEVS => {
                for d in a.nested() {
                    devs.push(c_string(d.map_err(|e| anyhow!("chain devices: {e}"))?.payload));
                }
            }
            _ => {}
        }
    }
    Ok((num.ok_or_else(|| anyhow!("chain hook without its number"))?, prio, devs))
}

/// A NUL-terminated netlink string.
fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A NEWCHAIN payload as the kernel sends it (nf_tables_fill_chain_info).
    pub fn chain_msg(family: u8, table: &str, name: &str, hook: Option<(u32, i32, &[&str])>) -> Vec<u8> {
        let mut b = NlMsgBuilder::new((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWCHAIN, 0, DUMP_SEQ);
        b.nfgenmsg(family, 0);
        b.put(NFTA_CHAIN_TABLE, format!("{table}\0").as_bytes());
        b.put(NFTA_CHAIN_NAME, format!("{name}\0").as_bytes());
        if let Some((num, prio, devs)) = hook {
            let h = b.nest_start(NFTA_CHAIN_HOOK);
            b.put_be32(NFTA_HOOK_HOOKNUM, num);
            b.put_be32(NFTA_HOOK_PRIORITY, prio as u32);
            if let [one] = devs {
                b.put(NFTA_HOOK_DEV, format!("{one}\0").as_bytes());
            } else {
                let n = b.nest_start(NFTA_HOOK_DEVS);
                for d in devs {
                    b.put(1, format!("{d}\0").as_bytes());
                }
                b.nest_end(n);
            }
            b.nest_end(h);
        }
        b.finish()
    }

    fn parse(msg: &[u8]) -> Option<DeviceChain> {
        parse_chain(&msg[16..]).unwrap()
    }

    #[test]
    fn device_chains_are_recognised_by_family_and_hook() {
        let c = parse(&chain_msg(NFPROTO_NETDEV, "t", "c", Some((0, -150, &["rlan"])))).unwrap();
        assert_eq!((c.family, c.side, c.priority), ("netdev", Side::Ingress, -150));
        assert_eq!((c.label(), c.devices), ("netdev t c".to_string(), vec!["rlan".to_string()]));
        let c = parse(&chain_msg(NFPROTO_NETDEV, "t", "e", Some((1, 0, &["rwan", "rwan2"])))).unwrap();
        assert_eq!((c.side, c.devices), (Side::Egress, vec!["rwan".to_string(), "rwan2".to_string()]));
        let c = parse(&chain_msg(NFPROTO_INET, "fw", "i", Some((5, 0, &["rwan"])))).unwrap();
        assert_eq!((c.family, c.side), ("inet", Side::Ingress), "inet ingress runs at netdev ingress");
        for (hook, side) in [(0, Side::Ingress), (1, Side::Ingress), (3, Side::Egress), (4, Side::Egress)] {
            let c = parse(&chain_msg(NFPROTO_BRIDGE, "bt", "c", Some((hook, 0, &[])))).unwrap();
            assert_eq!((c.family, c.side, c.devices.len()), ("bridge", side, 0), "bridge hook {hook}");
        }
        let cases: [(&str, Vec<u8>); 5] = [
            ("bridge forward: bridged frames only", chain_msg(NFPROTO_BRIDGE, "bt", "f", Some((2, 0, &[])))),
            ("inet forward", chain_msg(NFPROTO_INET, "fw4", "forward", Some((2, 0, &[])))),
            ("ip prerouting", chain_msg(2, "t", "pre", Some((0, 0, &[])))),
            ("regular chain", chain_msg(NFPROTO_NETDEV, "t", "jump_target", None)),
            (
                "inet prerouting (hook 0 is not netdev ingress there)",
                chain_msg(NFPROTO_INET, "t", "p", Some((0, 0, &[]))),
            ),
        ];
        for (what, m) in cases {
            assert_eq!(parse(&m), None, "{what}");
        }
    }

    #[test]
    fn a_dump_datagram_is_absorbed_until_done() {
        let mut d = chain_msg(NFPROTO_NETDEV, "t", "c", Some((0, 0, &["rlan"])));
        d.extend(chain_msg(NFPROTO_INET, "fw4", "forward", Some((2, 0, &[]))));
        let mut out = Vec::new();
        assert!(!absorb(&d, &mut out).unwrap(), "no NLMSG_DONE yet");
        assert_eq!(out.len(), 1);
        let done = NlMsgBuilder::new(NLMSG_DONE, 0, DUMP_SEQ).finish();
        assert!(absorb(&done, &mut out).unwrap());
        let mut err = NlMsgBuilder::new(NLMSG_ERROR, 0, DUMP_SEQ);
        err.put(0, &[]);
        let mut e = err.finish();
        e[16..20].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
        assert!(absorb(&e, &mut out).unwrap_err().to_string().contains("not permitted"));
        e[16..20].copy_from_slice(&(-libc::EINVAL).to_ne_bytes());
        assert!(absorb(&e, &mut out).unwrap(), "no nf_tables in this kernel: no chains");
        assert_eq!(out.len(), 1);
        assert!(parse_chain(&[]).unwrap_err().to_string().contains("nfgenmsg"));
    }
}
