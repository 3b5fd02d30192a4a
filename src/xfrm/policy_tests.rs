use super::*;

/// XFRM_MSG_GETPOLICY dump replies recorded on this project's 6.18 kernel
/// (`ip xfrm policy add` of the four policies below, then the dump through a
/// NETLINK_XFRM socket), ending with NLMSG_DONE.
const DUMP: &[u8] = include_bytes!("testdata/policies-6.18.bin");
/// The XFRM_MSG_GETDEFAULT reply after `ip xfrm policy setdefault in accept
/// fwd block out accept`.
const DEFAULT_FWD_BLOCK: &[u8] = include_bytes!("testdata/default-fwd-block-6.18.bin");

fn p4(a: [u8; 4], len: u8) -> Prefix {
    Prefix::new(IpAddr::from(a), len)
}

#[test]
fn a_recorded_dump_decodes_to_its_policies() {
    let d = decode_datagram(DUMP, Some(1));
    assert!(d.bad.is_empty(), "{:?}", d.bad);
    assert!(d.done && d.error.is_none());
    let shown: Vec<String> = d.policies.iter().map(|p| p.to_string()).collect();
    assert_eq!(
        shown,
        [
            "dir out src 192.168.1.0/24 dst 192.168.2.0/24 priority 10",
            "dir out src fd00:1::/64 dst fd00:2::2/128 tmpl esp transport level use",
            "dir fwd src 10.0.0.0/8 dst 0.0.0.0/0 mark 0x2a/0xff action block",
            "dir out src 192.168.1.0/24 dst 203.0.113.2/32 proto udp dport 9999 priority 100 tmpl esp tunnel",
        ]
    );
    let esp = &d.policies[3];
    assert_eq!(esp.sel.src, p4([192, 168, 1, 0], 24));
    assert_eq!(esp.sel.dst, p4([203, 0, 113, 2], 32));
    assert_eq!((esp.sel.proto, esp.sel.dport, esp.sel.dport_mask), (17, 9999, 0xffff));
    assert_eq!((esp.sel.sport, esp.sel.sport_mask), (0, 0));
    assert_eq!(esp.templates, [Template { proto: 50, mode: 1, optional: false }]);
    assert!(!esp.block && !esp.bypass() && !esp.sub && esp.mark == (0, 0) && esp.if_id == 0);
    assert_eq!(d.policies[0].if_id, 7);
    assert!(d.policies[0].bypass());
    assert!(d.policies[1].templates[0].optional);
    assert_eq!(d.policies[2].mark, (0x2a, 0xff));
    assert!(d.policies[2].block && d.policies[2].dir == Dir::Fwd);
    // another sequence number is someone else's answer
    assert_eq!(decode_datagram(DUMP, Some(2)).messages, 0);
}

#[test]
fn the_default_reply_decodes() {
    let d = decode_datagram(DEFAULT_FWD_BLOCK, Some(1));
    assert!(d.bad.is_empty(), "{:?}", d.bad);
    let spd = Spd::new(vec![], d.defaults.expect("defaults"), None);
    assert!(spd.fwd_block && !spd.out_block);
}

#[test]
fn broken_messages_are_named_and_the_rest_kept() {
    // the first policy message cut short after 40 bytes of its body
    let first_len = u32::from_ne_bytes(DUMP[..4].try_into().unwrap()) as usize;
    let mut short = DUMP[..first_len].to_vec();
    short.truncate(56);
    short[..4].copy_from_slice(&56u32.to_ne_bytes());
    short.extend_from_slice(&DUMP[first_len..]);
    let d = decode_datagram(&short, Some(1));
    assert_eq!(d.bad.len(), 1, "{:?}", d.bad);
    assert!(d.bad[0].contains("shorter than its header"), "{}", d.bad[0]);
    assert_eq!(d.policies.len(), 3, "the others are kept");
    assert!(d.done);

    // an unknown direction
    let mut bad_dir = DUMP.to_vec();
    // xfrm_userpolicy_info.dir: after selector (56), lifetime cfg (64) and cur (32), priority, index
    bad_dir[16 + 56 + 64 + 32 + 8] = 9;
    let d = decode_datagram(&bad_dir, Some(1));
    assert_eq!(d.bad, ["unknown policy direction 9"]);

    // garbage: a header claiming more than there is
    let d = decode_datagram(&[0xff; 40], None);
    assert_eq!(d.bad.len(), 1);
    assert!(d.policies.is_empty());
    assert!(decode_datagram(&[1, 2, 3], None).bad.len() == 1);
}

#[test]
fn the_spd_keeps_forwarding_policies_in_lookup_order() {
    let mk = |dir, priority, sub, block, tmpl: bool| Policy {
        dir,
        block,
        priority,
        index: 0,
        sub,
        sel: Selector::default(),
        templates: if tmpl { vec![Template { proto: 50, mode: 1, optional: false }] } else { vec![] },
        mark: (0, 0),
        if_id: 0,
    };
    let spd = Spd::new(
        vec![
            mk(Dir::Out, 5, false, false, false), // bypass, priority 5
            mk(Dir::In, 0, false, true, false),   // in: dropped
            mk(Dir::Out, 5, false, false, true),  // esp, priority 5: before the bypass of equal priority
            mk(Dir::Fwd, 1, false, true, false),
            mk(Dir::Out, 9, true, false, false), // sub policy: first of all
        ],
        UserPolicyDefault::default(),
        None,
    );
    let order: Vec<(Dir, u32, bool, bool)> =
        spd.policies.iter().map(|p| (p.dir, p.priority, p.sub, p.bypass())).collect();
    assert_eq!(
        order,
        [
            (Dir::Out, 9, true, true),
            (Dir::Fwd, 1, false, false),
            (Dir::Out, 5, false, false),
            (Dir::Out, 5, false, true)
        ]
    );
    assert!(!spd.is_empty());
    assert!(Spd::default().is_empty());
    assert!(!Spd::unreadable("x".into()).is_empty());
}
