//! What the metrics endpoint serves (`crate::metrics`): the engine's
//! counters and gauges in the Prometheus text format, through the
//! prometheus-client crate, rendered per scrape from `status` and `hosts`
//! (a fresh registry each time: the engine's own counters stay where they
//! are; nothing is kept twice). Label values are the stable codes `status`
//! uses in JSON, never sentences.

use prometheus_client::encoding::prometheus_text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::control::{HostView, Status};

use super::Core;

type Labels = Vec<(&'static str, String)>;

impl Core {
    pub(super) fn metrics_text(&mut self) -> String {
        let hosts = self.host_list();
        render(&self.status(), &hosts)
    }
}

fn counter(r: &mut Registry, name: &str, help: &str, v: u64) {
    let c: Counter = Counter::default();
    // `as _`: the crate's counters are u32 where the target has no 64-bit
    // atomics (32-bit MIPS).
    c.inc_by(v as _);
    r.register(name, help, c);
}

fn gauge(r: &mut Registry, name: &str, help: &str, v: u64) {
    let g: Gauge = Gauge::default();
    g.set(v as _);
    r.register(name, help, g);
}

fn counters(r: &mut Registry, name: &str, help: &str, rows: impl IntoIterator<Item = (Labels, u64)>) {
    let f = Family::<Labels, Counter>::default();
    for (l, v) in rows {
        f.get_or_create(&l).inc_by(v as _);
    }
    r.register(name, help, f);
}

/// A counter per value of one label.
fn labelled<'a>(
    r: &mut Registry,
    name: &str,
    help: &str,
    label: &'static str,
    rows: impl IntoIterator<Item = (&'a str, u64)>,
) {
    counters(r, name, help, rows.into_iter().map(|(k, v)| (vec![(label, k.to_string())], v)));
}

/// The text for one scrape.
pub fn render(s: &Status, hosts: &[HostView]) -> String {
    let mut r = Registry::with_prefix("nft_offload");
    gauge(&mut r, "up", "1 while the engine answers", 1);
    gauge(&mut r, "uptime_seconds", "Seconds since the engine started", s.uptime_s);
    counter(&mut r, "fast_path_packets", "Packets the fast path forwarded", s.fast_path_packets);
    counter(&mut r, "fast_path_bytes", "Bytes (IP) the fast path forwarded", s.fast_path_bytes);
    let slow = s.slow_path.iter().map(|(k, v)| (k.as_str(), *v));
    labelled(&mut r, "slow_path_packets", "Packets the fast path handed to the kernel, by reason", "reason", slow);
    counter(&mut r, "offloads", "Connections put on the fast path", s.offloads_total);
    let down = s.teardowns.iter().map(|(k, v)| (k.as_str(), *v));
    labelled(&mut r, "teardowns", "Connections taken off the fast path, by reason", "reason", down);
    let mut by_code: std::collections::BTreeMap<&str, u64> = Default::default();
    for n in &s.not_offloaded {
        *by_code.entry(&n.code).or_default() += n.connections;
    }
    let help = "Connections that asked for offload and were not offloaded, by reason code (each once per reason)";
    labelled(&mut r, "not_offloaded_connections", help, "code", by_code);
    let flows = Family::<Labels, Gauge>::default();
    for (state, n) in
        [("offloaded", s.flows_offloaded), ("dormant", s.flows_dormant), ("waiting", s.flows_waiting_for_neighbour)]
    {
        flows.get_or_create(&vec![("state", state.to_string())]).set(n as _);
    }
    r.register("flows", "Connections the engine handles, by state", flows);
    let up = s.interfaces.iter().filter(|i| i.up).count() as u64;
    for (name, help, v) in [
        ("flow_capacity", "Connections the fast path's table holds", u64::from(s.flow_capacity)),
        ("map_memory_bytes", "Kernel memory of the fast path's maps", s.map_memory_bytes),
        ("engine_resident_bytes", "The engine's resident memory", s.daemon_rss_bytes),
        ("interfaces_up", "Managed interfaces that are up", up),
    ] {
        gauge(&mut r, name, help, v);
    }
    for (name, help, v) in [
        ("conntrack_events", "Conntrack events read", s.conntrack_events),
        ("conntrack_resyncs", "Full conntrack dumps after lost events", s.conntrack_resyncs),
        ("conntrack_refreshes", "Conntrack timeouts the engine refreshed over ctnetlink", s.conntrack_refreshes),
        ("fast_path_conntrack_refreshes", "Conntrack entries the fast path refreshed itself", s.fast_path_ct_refreshes),
    ] {
        counter(&mut r, name, help, v);
    }
    let lat = Family::<Labels, Gauge>::default();
    for (q, v) in &s.offload_latency_us {
        let q = match q.as_str() {
            "p50" => "0.5",
            "p99" => "0.99",
            other => other,
        };
        lat.get_or_create(&vec![("quantile", q.to_string())]).set(i64::from(*v) as _);
    }
    r.register("offload_latency_microseconds", "From a conntrack event to both map entries installed", lat);
    let dir = |h: &HostView, up: bool| {
        vec![("host", h.host.clone()), ("direction", if up { "upload" } else { "download" }.into())]
    };
    counters(
        &mut r,
        "host_packets",
        "Packets per host through the router, offloaded ones included (upload: sent by the host)",
        hosts.iter().flat_map(|h| [(dir(h, true), h.upload_packets), (dir(h, false), h.download_packets)]),
    );
    counters(
        &mut r,
        "host_bytes",
        "Bytes (IP) per host through the router, offloaded ones included (upload: sent by the host)",
        hosts.iter().flat_map(|h| [(dir(h, true), h.upload_bytes), (dir(h, false), h.download_bytes)]),
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::NotOffloadedView;

    #[test]
    fn a_scrape_in_the_text_format() {
        let s: Status = serde_json::from_value(serde_json::json!({
            "pid": 1, "uptime_s": 5, "mode_requested": "auto", "interfaces": [],
            "flows_offloaded": 2, "flows_waiting_for_neighbour": 0, "flows_dormant": 1, "flow_capacity": 4096,
            "idle_timeout_s": 30, "fast_path_packets": 1000, "fast_path_bytes": 1_500_000,
            "slow_path": {"no_flow": 7}, "offloads_total": 3, "teardowns": {"idle": 1},
            "not_offloaded": [], "conntrack_events": 9, "conntrack_resyncs": 0, "conntrack_refreshes": 0,
            "offload_latency_us": {"p50": 40, "p99": 90}
        }))
        .unwrap();
        let s = Status {
            not_offloaded: vec![
                NotOffloadedView { code: "excluded".into(), reason: "excluded by port 22".into(), connections: 2 },
                NotOffloadedView { code: "excluded".into(), reason: "excluded by port 53".into(), connections: 1 },
            ],
            ..s
        };
        let h = HostView {
            host: "192.168.1.2".into(),
            connections: 1,
            upload_packets: 10,
            upload_bytes: 14_000,
            download_packets: 5,
            download_bytes: 300,
        };
        let t = render(&s, &[h]);
        for line in [
            "# TYPE nft_offload_fast_path_bytes_total counter",
            "nft_offload_fast_path_bytes_total 1500000",
            "nft_offload_slow_path_packets_total{reason=\"no_flow\"} 7",
            "nft_offload_not_offloaded_connections_total{code=\"excluded\"} 3",
            "nft_offload_flows{state=\"offloaded\"} 2",
            "nft_offload_offload_latency_microseconds{quantile=\"0.99\"} 90",
            "nft_offload_host_bytes_total{host=\"192.168.1.2\",direction=\"upload\"} 14000",
            "nft_offload_host_packets_total{host=\"192.168.1.2\",direction=\"download\"} 5",
            "nft_offload_up 1",
        ] {
            assert!(t.lines().any(|l| l == line), "no {line:?} in:\n{t}");
        }
    }
}
