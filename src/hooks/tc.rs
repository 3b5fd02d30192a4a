//! tc qdiscs and classic filters from rtnetlink dumps (RTM_GETQDISC for
//! every device, RTM_GETTFILTER per managed device and hook), decoded with
//! netlink-packet-route. A message the crate cannot decode still counts:
//! its kind is read from the raw TCA_KIND, so an unknown filter holds its
//! direction like any other.

use anyhow::Result;
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionMirrorOption, TcActionOption, TcAttribute, TcFilterBpfOption,
    TcFilterFlowerOption, TcFilterMatchAllOption, TcFilterU32Option, TcMessage, TcMirrorActionType, TcOption,
};
use netlink_packet_route::RouteNetlinkMessage;

use crate::conntrack::nla::NlaIter;
use crate::routes::dump::dump_map;

/// The parent a clsact or ingress qdisc's ingress filters hang from
/// (`tc filter add dev X ingress` / `parent ffff:`): TC_H_MAKE(TC_H_CLSACT,
/// TC_H_MIN_INGRESS), include/uapi/linux/pkt_sched.h. The ingress qdisc's
/// `ingress_find` ignores the minor, so both qdiscs answer to it.
pub const PARENT_INGRESS: u32 = 0xffff_fff2;
/// clsact's egress filters (TC_H_MIN_EGRESS).
pub const PARENT_EGRESS: u32 = 0xffff_fff3;
/// The `ingress` and `clsact` qdiscs sit at TC_H_INGRESS.
const TC_H_INGRESS: u32 = 0xffff_fff1;

const TC_HEADER_LEN: usize = 20;
const TCA_KIND: u16 = 1;

/// A qdisc on some device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qdisc {
    pub ifindex: u32,
    pub kind: String,
    pub parent: u32,
}

impl Qdisc {
    /// `ingress` / `clsact`: a hook for filters, not a queue.
    pub fn is_hook(&self) -> bool {
        self.parent == TC_H_INGRESS
    }
}

/// One tc action of a filter.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Action {
    pub kind: String,
    /// mirred: the device it redirects or mirrors to.
    pub target: Option<u32>,
}

/// The program of a cls_bpf filter: TCA_BPF_ID, and the name before
/// libbpf's ":[id]" in TCA_BPF_NAME (`tc_add_fd_and_name`, libbpf netlink.c;
/// tc(8) puts the object file and section there).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BpfProg {
    pub id: u32,
    pub name: String,
    /// The filter's handle (`tc filter del ... handle H bpf`).
    pub handle: u32,
}

/// One classic filter (all the nodes of one `pref`, as u32's hash tables
/// dump several messages for one filter).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Filter {
    pub pref: u16,
    pub kind: String,
    pub actions: Vec<Action>,
    /// cls_bpf: the programs under this pref (one per handle).
    pub bpf: Vec<BpfProg>,
}

impl Filter {
    /// The first mirred target, if any.
    pub fn redirects_to(&self) -> Option<u32> {
        self.actions.iter().find_map(|a| a.target)
    }
}

/// Every qdisc of this namespace.
pub fn qdiscs() -> Result<Vec<Qdisc>> {
    let msgs = dump_tc(RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()), "qdisc")?;
    Ok(msgs.into_iter().map(|m| Qdisc { ifindex: m.ifindex, kind: m.kind, parent: m.parent }).collect())
}

/// The classic filters of `ifindex` under `parent` (PARENT_INGRESS or
/// PARENT_EGRESS).
pub fn filters(ifindex: u32, parent: u32) -> Result<Vec<Filter>> {
    let mut req = TcMessage::with_index(ifindex as i32);
    req.header.parent = parent.into();
    let msgs = dump_tc(RouteNetlinkMessage::GetTrafficFilter(req), "filter")?;
    Ok(merge(msgs.into_iter().filter(|m| m.ifindex == ifindex)))
}

/// What one dumped tc message says, decoded or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcInfo {
    pub ifindex: u32,
    pub parent: u32,
    /// tcm_info: a filter's priority in the upper 16 bits.
    pub info: u32,
    pub kind: String,
    pub actions: Vec<Action>,
    /// tcm_handle.
    pub handle: u32,
    /// cls_bpf: TCA_BPF_ID and TCA_BPF_NAME.
    pub bpf: Option<(u32, String)>,
}

/// Filters by priority, their nodes' actions together.
fn merge(msgs: impl Iterator<Item = TcInfo>) -> Vec<Filter> {
    let mut out: Vec<Filter> = Vec::new();
    for m in msgs {
        let pref = (m.info >> 16) as u16;
        let bpf = m.bpf.map(|(id, name)| BpfProg { id, name: prog_name_of(&name).to_string(), handle: m.handle });
        match out.iter_mut().find(|f| f.pref == pref && f.kind == m.kind) {
            Some(f) => {
                f.actions.extend(m.actions);
                f.bpf.extend(bpf);
            }
            None => out.push(Filter { pref, kind: m.kind, actions: m.actions, bpf: bpf.into_iter().collect() }),
        }
    }
    for f in &mut out {
        f.actions.sort();
        f.actions.dedup();
        f.bpf.sort();
        f.bpf.dedup();
    }
    out.sort();
    out
}

fn dump_tc(request: RouteNetlinkMessage, what: &str) -> Result<Vec<TcInfo>> {
    dump_map(request, &format!("tc {what}"), |m| {
        Ok(match m {
            Ok(RouteNetlinkMessage::NewQueueDiscipline(t) | RouteNetlinkMessage::NewTrafficFilter(t)) => {
                Some(info_of(&t))
            }
            Ok(_) => None,
            // Still a qdisc or filter that exists: keep what the raw
            // message says.
            Err(raw) => raw.get(16..).and_then(raw_info),
        })
    })
}

/// The program name in a cls_bpf filter's TCA_BPF_NAME: libbpf writes
/// "NAME:[ID]".
fn prog_name_of(name: &str) -> &str {
    name.rsplit_once(":[").map_or(name, |(n, _)| n)
}

/// A decoded qdisc or filter message.
pub fn info_of(m: &TcMessage) -> TcInfo {
    let mut kind = String::new();
    let mut actions = Vec::new();
    let (mut bpf_id, mut bpf_name) = (None, String::new());
    for a in &m.attributes {
        match a {
            TcAttribute::Kind(k) => kind = k.clone(),
            TcAttribute::Options(opts) => {
                for o in opts {
                    actions.extend(option_actions(o));
                    match o {
                        TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => bpf_id = Some(*id),
                        TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => bpf_name = n.clone(),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    TcInfo {
        ifindex: m.header.index as u32,
        parent: m.header.parent.into(),
        info: m.header.info,
        kind,
        actions,
        handle: m.header.handle.into(),
        bpf: bpf_id.map(|id| (id, bpf_name)),
    }
}

fn option_actions(o: &TcOption) -> Vec<Action> {
    match o {
        TcOption::U32(TcFilterU32Option::Action(acts))
        | TcOption::MatchAll(TcFilterMatchAllOption::Action(acts))
        | TcOption::Flower(TcFilterFlowerOption::Actions(acts)) => acts.iter().map(action_of).collect(),
        TcOption::U32(TcFilterU32Option::Police(_)) => vec![Action { kind: "police".into(), target: None }],
        _ => Vec::new(),
    }
}

fn action_of(a: &TcAction) -> Action {
    let mut act = Action { kind: String::new(), target: None };
    for at in &a.attributes {
        match at {
            TcActionAttribute::Kind(k) => act.kind = k.clone(),
            TcActionAttribute::Options(opts) => {
                for o in opts {
                    if let TcActionOption::Mirror(TcActionMirrorOption::Parms(p)) = o {
                        if !matches!(p.eaction, TcMirrorActionType::Other(_)) {
                            act.target = Some(p.ifindex);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    act
}

/// The header and TCA_KIND of a tc message the crate could not decode.
fn raw_info(b: &[u8]) -> Option<TcInfo> {
    let h = b.get(..TC_HEADER_LEN)?;
    let word = |i: usize| u32::from_ne_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let kind = NlaIter::new(&b[TC_HEADER_LEN..])
        .filter_map(|a| a.ok())
        .find(|a| a.kind == TCA_KIND)
        .map(|a| String::from_utf8_lossy(a.payload).trim_end_matches('\0').to_string())
        .unwrap_or_else(|| "?".into());
    Some(TcInfo {
        ifindex: word(4),
        parent: word(12),
        info: word(16),
        kind: format!("{kind} (undecoded)"),
        actions: Vec::new(),
        handle: word(8),
        bpf: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{Emitable, Parseable};

    /// `tc filter add dev rwan parent ffff: protocol all u32 match u32 0 0
    /// action mirred egress redirect dev ifb4rwan` as the kernel dumps it:
    /// built with the crate's own types, so the test covers our reading of
    /// them, and then through the raw fallback.
    fn u32_mirred(ifindex: i32, target: u32, pref: u16) -> TcMessage {
        let mut mirror = netlink_packet_route::tc::TcMirror::default();
        mirror.eaction = TcMirrorActionType::EgressRedir;
        mirror.ifindex = target;
        let mut act = TcAction::default();
        act.attributes = vec![
            TcActionAttribute::Kind("mirred".into()),
            TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(mirror))]),
        ];
        let mut m = TcMessage::with_index(ifindex);
        m.header.parent = PARENT_INGRESS.into();
        m.header.info = (u32::from(pref) << 16) | 0x0003;
        m.attributes = vec![
            TcAttribute::Kind("u32".into()),
            TcAttribute::Options(vec![TcOption::U32(TcFilterU32Option::Action(vec![act]))]),
        ];
        m
    }

    #[test]
    fn a_u32_mirred_filter_names_its_target() {
        let i = info_of(&u32_mirred(4, 9, 49152));
        assert_eq!((i.ifindex, i.parent, i.kind.as_str()), (4, PARENT_INGRESS, "u32"));
        assert_eq!(i.actions, vec![Action { kind: "mirred".into(), target: Some(9) }]);
        // the u32 hash-table node of the same filter carries no action
        let mut node = u32_mirred(4, 9, 49152);
        node.attributes.truncate(1);
        let f = merge([info_of(&node), info_of(&u32_mirred(4, 9, 49152))].into_iter());
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!((f[0].pref, f[0].redirects_to()), (49152, Some(9)));
    }

    #[test]
    fn an_undecodable_message_still_names_a_filter() {
        let m = u32_mirred(4, 9, 1);
        let mut b = vec![0u8; m.buffer_len()];
        m.emit(&mut b);
        let parsed = TcMessage::parse(&b).unwrap();
        assert_eq!(info_of(&parsed).actions.len(), 1, "the crate reads back what it wrote");
        let raw = raw_info(&b).unwrap();
        assert_eq!((raw.ifindex, raw.parent, raw.kind.as_str()), (4, PARENT_INGRESS, "u32 (undecoded)"));
        assert_eq!(raw_info(&b[..10]), None);
    }

    /// A cls_bpf filter libbpf attached (`bpf_tc_attach`) names its
    /// program by id and "NAME:[ID]": both read, with the handle, so the
    /// engine can tell its own filters from others'.
    #[test]
    fn a_cls_bpf_filter_names_its_program() {
        let bpf = |handle: u32, id, name: &str| {
            let mut m = TcMessage::with_index(4);
            m.header.parent = PARENT_INGRESS.into();
            m.header.info = (1 << 16) | 0x0003;
            m.header.handle = handle.into();
            m.attributes = vec![
                TcAttribute::Kind("bpf".into()),
                TcAttribute::Options(vec![
                    TcOption::Bpf(TcFilterBpfOption::ProgName(name.into())),
                    TcOption::Bpf(TcFilterBpfOption::ProgId(id)),
                ]),
            ];
            info_of(&m)
        };
        let i = bpf(1, 42, "fo_tc:[42]");
        assert_eq!((i.handle, i.bpf.clone()), (1, Some((42, "fo_tc:[42]".into()))));
        // two programs under one pref, as two handles
        let f = merge([bpf(2, 7, "other.o:[classifier]"), i].into_iter());
        assert_eq!(f.len(), 1, "{f:?}");
        let names: Vec<(u32, &str, u32)> = f[0].bpf.iter().map(|p| (p.id, p.name.as_str(), p.handle)).collect();
        assert_eq!(names, [(7, "other.o", 2), (42, "fo_tc", 1)]);
        assert_eq!(prog_name_of("fo_tc_egress_l3:[9]"), "fo_tc_egress_l3");
        assert_eq!(prog_name_of("plain"), "plain");
    }

    #[test]
    fn ingress_and_clsact_are_hooks_not_queues() {
        let q = |kind: &str, parent| Qdisc { ifindex: 1, kind: kind.into(), parent };
        assert!(q("ingress", TC_H_INGRESS).is_hook() && q("clsact", TC_H_INGRESS).is_hook());
        assert!(!q("htb", 0xffff_ffff).is_hook());
    }
}
