//! Lifecycle of an offloaded flow: when to refresh its conntrack timeout and
//! when to take it off the fast path. Pure functions over clocks and flags.
//!
//! Keepalive: conntrack sees none of the fast-pathed packets, so it would
//! expire the entry. The kernel flowtable bumps the timeout to a day and
//! fixes it up on teardown (`nf_flow_table_extend_ct_timeout`,
//! `flow_offload_fixup_ct` in net/netfilter/nf_flow_table_core.c). We instead
//! do what conntrack itself would have done had it seen the packets: while
//! packets flow, the entry's timeout is reset to the timeout of its state.
//! If the daemon dies, nothing needs fixing: the entry ages normally.

use std::time::Duration;

use crate::dataplane::fo_teardown;
use crate::proto::IPPROTO_TCP;

/// Conntrack's per-state timeouts in this network namespace (seconds), from
/// /proc/sys/net/netfilter/nf_conntrack_*_timeout_*.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtTimeouts {
    pub tcp_established: u32,
    pub udp: u32,
    pub udp_stream: u32,
}

impl Default for CtTimeouts {
    /// The kernel defaults (nf_conntrack_proto_tcp.c, nf_conntrack_proto_udp.c).
    fn default() -> Self {
        CtTimeouts { tcp_established: 5 * 24 * 3600, udp: 30, udp_stream: 120 }
    }
}

impl CtTimeouts {
    /// Timeout conntrack would give an entry of this protocol after a packet.
    pub fn for_flow(&self, proto: u8, seen_reply: bool) -> u32 {
        match (proto, seen_reply) {
            (IPPROTO_TCP, _) => self.tcp_established,
            (_, true) => self.udp_stream,
            _ => self.udp,
        }
    }
}

/// Clock readings for one offloaded connection (CLOCK_MONOTONIC ns, the
/// clock of bpf_ktime_get_coarse_ns).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowClock {
    pub installed_ns: u64,
    /// Newest last-seen stamp of either direction; 0 = no packet yet.
    pub last_seen_ns: u64,
    /// When we last refreshed the conntrack timeout.
    pub last_refresh_ns: u64,
    /// The last-seen stamp that refresh covered.
    pub refreshed_seen_ns: u64,
    /// When the conntrack entry expires unless refreshed: from the timeout
    /// conntrack reported when it was installed, then from our refreshes.
    pub ct_expires_ns: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TeardownReason {
    TcpFin,
    TcpRst,
    Idle,
    ConntrackDestroyed,
    NoLongerEligible,
    InterfaceDown,
    RouteChange,
    Policy,
    /// Both directions must now go through the kernel (`flow::Hold`).
    Held,
    /// The nftables ruleset changed: back through the kernel's new rules,
    /// returning on evidence that they forward the connection.
    RulesetChange,
    Shutdown,
}

impl TeardownReason {
    pub fn as_str(self) -> &'static str {
        match self {
            TeardownReason::TcpFin => "tcp_fin",
            TeardownReason::TcpRst => "tcp_rst",
            TeardownReason::Idle => "idle",
            TeardownReason::ConntrackDestroyed => "conntrack_destroyed",
            TeardownReason::NoLongerEligible => "no_longer_eligible",
            TeardownReason::InterfaceDown => "interface_down",
            TeardownReason::RouteChange => "route_change",
            TeardownReason::Policy => "policy",
            TeardownReason::Held => "held",
            TeardownReason::RulesetChange => "ruleset_change",
            TeardownReason::Shutdown => "shutdown",
        }
    }

    /// What the fast path's `fo_flow.teardown` code (`enum fo_teardown`,
    /// bpf/flow.h) means; `None` while the flow is live.
    pub fn from_fast_path(code: u32) -> Option<TeardownReason> {
        match fo_teardown(code) {
            fo_teardown::FO_TD_NONE => None,
            fo_teardown::FO_TD_RST => Some(TeardownReason::TcpRst),
            // FO_TD_FIN, the only other code the fast path writes.
            _ => Some(TeardownReason::TcpFin),
        }
    }
}

// What the control plane assumes of flow.h's codes: a zeroed entry is
// live, and RST outranks FIN when both directions are combined with `max`.
const _: () = assert!(
    fo_teardown::FO_TD_NONE.0 == 0
        && fo_teardown::FO_TD_FIN.0 > 0
        && fo_teardown::FO_TD_RST.0 > fo_teardown::FO_TD_FIN.0
);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Keep,
    /// Set the conntrack timeout to this many seconds.
    Refresh(u32),
    Teardown(TeardownReason),
}

/// How often an active flow's conntrack timeout is refreshed: a third of the
/// timeout so an entry never gets close to expiring, between 1 s and 60 s.
pub fn refresh_interval(ct_timeout_s: u32) -> Duration {
    let ms = u64::from(ct_timeout_s) * 1000 / 3;
    Duration::from_millis(ms.clamp(1000, 60_000))
}

/// Decide what to do with one offloaded flow now.
/// `teardown_flag` is the fast path's `enum fo_teardown` code of either
/// direction (the larger of the two).
pub fn decide(now_ns: u64, c: &FlowClock, teardown_flag: u32, idle: Duration, ct_timeout_s: u32) -> Action {
    let end = decide_end(now_ns, c, teardown_flag, idle);
    if end != Action::Keep {
        return end;
    }
    // Against the entry's own deadline, not a cached timeout: conntrack
    // may have given it less than the current timeout (set by a slow-path
    // packet before the sysctl changed, or an unreplied UDP timeout), and a
    // shortened sysctl must shorten an entry refreshed with the old value,
    // as conntrack's next packet would.
    let t = u64::from(ct_timeout_s) * 1_000_000_000;
    let left = c.ct_expires_ns.saturating_sub(now_ns);
    let stale = left.saturating_add(refresh_interval(ct_timeout_s).as_nanos() as u64) <= t;
    let too_long = left > t + 1_000_000_000;
    let since_refresh = now_ns.saturating_sub(c.last_refresh_ns);
    if c.last_seen_ns > c.refreshed_seen_ns && since_refresh >= 1_000_000_000 && (stale || too_long) {
        return Action::Refresh(ct_timeout_s);
    }
    Action::Keep
}

/// What `decide` says before any refresh: the fast path saw the connection
/// close, or it went idle. All there is to decide about a connection whose
/// entry the fast path keeps alive itself (FO_F_CT_REFRESH, bpf/keepalive.h).
pub fn decide_end(now_ns: u64, c: &FlowClock, teardown_flag: u32, idle: Duration) -> Action {
    if let Some(r) = TeardownReason::from_fast_path(teardown_flag) {
        return Action::Teardown(r);
    }
    let active = c.last_seen_ns.max(c.installed_ns);
    if now_ns.saturating_sub(active) > idle.as_nanos() as u64 {
        return Action::Teardown(TeardownReason::Idle);
    }
    Action::Keep
}

/// When `decide_end` can next say something other than `Keep`: the moment
/// the connection goes idle if no packet comes. One read per connection per
/// idle timeout, whatever its traffic.
pub fn next_end_check(now_ns: u64, c: &FlowClock, idle: Duration) -> u64 {
    (c.last_seen_ns.max(c.installed_ns) + idle.as_nanos() as u64 + 1).max(now_ns + 1)
}

/// The status conntrack would have given a UDP entry (status `status`) had
/// it seen the packets the fast path forwarded since the last refresh,
/// `None` when that adds nothing: a reply sets IPS_SEEN_REPLY
/// (`nf_conntrack_in`), a packet after the reply IPS_ASSURED
/// (`nf_conntrack_udp_packet`), which spares the entry from `early_drop`
/// when the table fills. One step per refresh: ASSURED once the entry shows
/// the reply.
pub fn udp_status_seen(status: u32, reply_forwarded: bool) -> Option<u32> {
    use crate::conntrack::status::{ASSURED, SEEN_REPLY};
    let add = if status & SEEN_REPLY != 0 {
        ASSURED
    } else if reply_forwarded {
        SEEN_REPLY
    } else {
        0
    };
    (status & add != add).then_some(status | add)
}

/// When `decide` can next say something other than `Keep` about a flow
/// just judged at `now` (with the stamps read then): the moment it would
/// go idle if no packet came, or the moment its refresh falls due. Keepalive
/// reads a flow's map entries only then, so its cost follows what changes,
/// not the number of offloaded flows.
///
/// A refresh needs packets since the last one, which only a read shows: a
/// flow whose refresh was due but had none is looked at again later, ever
/// more often as its entry nears its end, so a packet is seen before the
/// entry expires unless it comes in the last tick (as with a check every
/// tick).
/// The shortest wait `next_check` asks for near an entry's end: the
/// engine's tick.
const LOOK_MIN_NS: u64 = 250_000_000;

pub fn next_check(now_ns: u64, c: &FlowClock, idle: Duration, ct_timeout_s: u32) -> u64 {
    const S: u64 = 1_000_000_000;
    let idle_at = c.last_seen_ns.max(c.installed_ns) + idle.as_nanos() as u64 + 1;
    let t = u64::from(ct_timeout_s) * S;
    let interval = refresh_interval(ct_timeout_s).as_nanos() as u64;
    let too_long = c.ct_expires_ns.saturating_sub(now_ns) > t + S;
    // decide's `stale`: left + interval <= t.
    let stale_at = (c.ct_expires_ns + interval).saturating_sub(t);
    let due = if too_long { c.last_refresh_ns + S } else { stale_at.max(c.last_refresh_ns + S) };
    // Had none: look again after an interval, and ever more often as the
    // entry nears its end (halving what is left, down to a tick).
    let left = c.ct_expires_ns.saturating_sub(now_ns);
    let refresh_at = if due <= now_ns { now_ns + interval.min((left / 2).max(LOOK_MIN_NS)) } else { due };
    idle_at.min(refresh_at).max(now_ns + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_conntrack_would_have_set_on_a_udp_entry() {
        use crate::conntrack::status::{ASSURED, CONFIRMED, SEEN_REPLY};
        let cases = [
            ("one way, no reply forwarded", CONFIRMED, false, None),
            ("one way, a reply forwarded", CONFIRMED, true, Some(CONFIRMED | SEEN_REPLY)),
            ("replied, packets after", CONFIRMED | SEEN_REPLY, false, Some(CONFIRMED | SEEN_REPLY | ASSURED)),
            ("already assured", CONFIRMED | SEEN_REPLY | ASSURED, true, None),
        ];
        for (what, status, reply, want) in cases {
            assert_eq!(udp_status_seen(status, reply), want, "{what}");
        }
    }

    const S: u64 = 1_000_000_000;

    /// Where the fast path refreshes the entry, only the close flag and
    /// idleness are left: no refresh ever, and one look per idle timeout.
    #[test]
    fn the_fast_path_s_keepalive_leaves_the_close_and_idleness() {
        let idle = Duration::from_secs(30);
        let c = FlowClock { installed_ns: 100 * S, last_seen_ns: 110 * S, ..Default::default() };
        #[rustfmt::skip]
        let rows = [
            // (case, now, teardown flag, action)
            ("active", 120 * S, 0, Action::Keep),
            ("idle one tick past its timeout", 140 * S + 1, 0, Action::Teardown(TeardownReason::Idle)),
            ("a FIN seen", 111 * S, fo_teardown::FO_TD_FIN.0, Action::Teardown(TeardownReason::TcpFin)),
        ];
        for (case, now, td, want) in rows {
            assert_eq!(decide_end(now, &c, td, idle), want, "{case}");
        }
        // decide says the same before it would refresh: a stale entry
        // with packets since gets a refresh there, never here.
        let stale = FlowClock { ct_expires_ns: 115 * S, last_refresh_ns: 100 * S, ..c };
        assert_eq!(decide(120 * S, &stale, 0, idle, 30), Action::Refresh(30));
        assert_eq!(decide_end(120 * S, &stale, 0, idle), Action::Keep);
        assert_eq!(next_end_check(120 * S, &c, idle), 140 * S + 1, "when it would go idle");
        assert_eq!(next_end_check(150 * S, &c, idle), 150 * S + 1, "past it: at once");
    }

    /// Checking only at `next_check` finds every action `decide` takes when
    /// asked at every instant, no later than one tick after: simulated over
    /// packet patterns, timeouts and idle limits, with refreshes applied as
    /// keepalive applies them.
    #[test]
    fn checking_at_next_check_misses_nothing() {
        let tick = S / 4;
        for (idle_s, timeout_s) in [(30, 120), (300, 120), (30, 432_000), (5, 8), (600, 30)] {
            let idle = Duration::from_secs(idle_s);
            for gap in [S / 10, 2 * S, 7 * S, 31 * S, 200 * S] {
                // packets every `gap` for 400 s, then silence
                let packet = |t: u64| t.is_multiple_of(gap) && t < 400 * S;
                let start = 1000 * S;
                let mut c = FlowClock {
                    installed_ns: start,
                    last_refresh_ns: start,
                    ct_expires_ns: start + 30 * S,
                    ..Default::default()
                };
                let mut next = start;
                let mut t = start;
                let ended = loop {
                    t += tick;
                    if packet(t - start) {
                        c.last_seen_ns = t;
                    }
                    if c.ct_expires_ns <= t {
                        break None;
                    }
                    if t < next {
                        continue;
                    }
                    match decide(t, &c, 0, idle, timeout_s) {
                        Action::Teardown(r) => break Some((r, t)),
                        Action::Refresh(secs) => {
                            c.last_refresh_ns = t;
                            c.ct_expires_ns = t + u64::from(secs) * S;
                            c.refreshed_seen_ns = c.last_seen_ns;
                        }
                        Action::Keep => {}
                    }
                    next = next_check(t, &c, idle, timeout_s);
                    assert!(next > t, "next_check moves forward");
                };
                let what = format!("idle {idle_s}s timeout {timeout_s}s gap {gap}");
                let active = c.last_seen_ns.max(c.installed_ns);
                match ended {
                    // Expired: only as conntrack would have expired it had
                    // it seen the packets (give or take a refresh interval).
                    // Never a packet: conntrack's own deadline ran out.
                    None => assert!(
                        c.last_seen_ns == 0 || t >= active + u64::from(timeout_s) * S / 2,
                        "{what}: conntrack entry expired {}s after a packet",
                        (t - active) / S
                    ),
                    Some((r, at)) => {
                        assert_eq!(r, TeardownReason::Idle, "{what}");
                        assert!(at <= active + idle.as_nanos() as u64 + tick, "{what}: idle noticed late");
                    }
                }
            }
        }
    }

    fn clock(installed: u64, seen: u64, refreshed_at: u64, refreshed_seen: u64) -> FlowClock {
        FlowClock {
            installed_ns: installed * S,
            last_seen_ns: seen * S,
            last_refresh_ns: refreshed_at * S,
            refreshed_seen_ns: refreshed_seen * S,
            ct_expires_ns: 0,
        }
    }

    fn expiring(mut c: FlowClock, at: u64) -> FlowClock {
        c.ct_expires_ns = at * S;
        c
    }

    const FIN: u32 = fo_teardown::FO_TD_FIN.0;
    const RST: u32 = fo_teardown::FO_TD_RST.0;

    #[test]
    fn fin_and_rst_tear_down_first() {
        let c = clock(100, 105, 100, 100);
        assert_eq!(decide(106 * S, &c, FIN, Duration::from_secs(30), 120), Action::Teardown(TeardownReason::TcpFin));
        assert_eq!(decide(106 * S, &c, RST, Duration::from_secs(30), 120), Action::Teardown(TeardownReason::TcpRst));
    }

    #[test]
    fn teardown_codes_are_flow_h_s() {
        assert_eq!(u32::from(crate::dataplane::fo_flow::default().teardown), fo_teardown::FO_TD_NONE.0);
        assert_eq!(TeardownReason::from_fast_path(fo_teardown::FO_TD_NONE.0), None);
        assert_eq!(TeardownReason::from_fast_path(FIN), Some(TeardownReason::TcpFin));
        assert_eq!(TeardownReason::from_fast_path(RST), Some(TeardownReason::TcpRst));
        assert_eq!(TeardownReason::from_fast_path(FIN.max(RST)), Some(TeardownReason::TcpRst));
    }

    #[test]
    fn idle_flow_leaves_after_idle_timeout() {
        let idle = Duration::from_secs(30);
        let c = clock(100, 110, 110, 110);
        assert_eq!(decide(139 * S, &c, 0, idle, 120), Action::Keep);
        assert_eq!(decide(141 * S, &c, 0, idle, 120), Action::Teardown(TeardownReason::Idle));
        // never saw a packet: idle counts from installation
        let c = clock(100, 0, 100, 0);
        assert_eq!(decide(131 * S, &c, 0, idle, 120), Action::Teardown(TeardownReason::Idle));
    }

    #[test]
    fn active_flow_refreshed_within_a_third_of_its_timeout() {
        let idle = Duration::from_secs(30);
        // ct timeout 9 s -> refresh every 3 s
        let c = expiring(clock(100, 102, 100, 100), 109);
        assert_eq!(decide(102 * S, &c, 0, idle, 9), Action::Keep);
        assert_eq!(decide(103 * S, &c, 0, idle, 9), Action::Refresh(9));
        // no new packets since the last refresh: nothing to refresh
        let c = expiring(clock(100, 103, 103, 103), 112);
        assert_eq!(decide(110 * S, &c, 0, idle, 9), Action::Keep);
    }

    /// The timeout changed under a refreshed entry (sysctl written): the
    /// entry follows at the next packet, in both directions.
    #[test]
    fn refresh_follows_the_current_timeout() {
        let idle = Duration::from_secs(300);
        // refreshed at 100 with 120 s; the sysctl is now 8 s
        let c = expiring(clock(100, 102, 100, 100), 220);
        assert_eq!(decide(102 * S, &c, 0, idle, 8), Action::Refresh(8));
        // refreshed with 8 s; the sysctl went back to 120 s
        let c = expiring(clock(100, 102, 100, 100), 108);
        assert_eq!(decide(102 * S, &c, 0, idle, 120), Action::Refresh(120));
        // at most once a second
        assert_eq!(decide(100 * S + S / 2, &c, 0, idle, 120), Action::Keep);
    }

    /// Installed with less time left than the state's timeout (conntrack
    /// set the unreplied UDP timeout): refreshed before that runs out, not
    /// a third of the stream timeout later.
    #[test]
    fn first_refresh_follows_the_reported_timeout() {
        let idle = Duration::from_secs(300);
        let c = expiring(clock(100, 101, 100, 0), 108);
        assert_eq!(decide(101 * S, &c, 0, idle, 120), Action::Refresh(120));
        // unknown timeout at install: refreshed at the first packet
        let c = clock(100, 101, 100, 0);
        assert_eq!(decide(101 * S, &c, 0, idle, 120), Action::Refresh(120));
    }

    #[test]
    fn refresh_interval_is_clamped() {
        assert_eq!(refresh_interval(1), Duration::from_secs(1));
        assert_eq!(refresh_interval(30), Duration::from_secs(10));
        assert_eq!(refresh_interval(432000), Duration::from_secs(60));
    }

    #[test]
    fn timeouts_per_protocol() {
        let t = CtTimeouts::default();
        assert_eq!(t.for_flow(IPPROTO_TCP, true), 432000);
        assert_eq!(t.for_flow(crate::proto::IPPROTO_UDP, false), 30);
        assert_eq!(t.for_flow(crate::proto::IPPROTO_UDP, true), 120);
    }
}
