//! Reading iperf3's `-J` output.

use anyhow::{anyhow, bail, Context, Result};

/// Values pulled out of iperf3's `-J` output.
#[derive(Debug, Default, PartialEq)]
pub struct IperfResult {
    pub bits_per_second: f64,
    pub sender_bits_per_second: f64,
    pub lost_percent: Option<f64>,
    pub retransmits: Option<u64>,
}

pub fn parse_iperf(json: &str, udp: bool) -> Result<IperfResult> {
    let v: serde_json::Value = serde_json::from_str(json).context("parsing iperf3 JSON")?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {e}");
    }
    let end = v.get("end").ok_or_else(|| anyhow!("iperf3 JSON without `end`"))?;
    let f = |o: Option<&serde_json::Value>, k: &str| o.and_then(|o| o.get(k)).and_then(|x| x.as_f64());
    if udp {
        // `end.sum` carries the sender's rate and the receiver's loss;
        // `sum_received` (iperf3 >= 3.?) the receiver's rate, which is what
        // made it through the router. Fall back to `sum` without it.
        let sum = end.get("sum");
        let sender = f(sum, "bits_per_second").ok_or_else(|| anyhow!("no end.sum.bits_per_second"))?;
        let recv = f(end.get("sum_received"), "bits_per_second").unwrap_or(sender);
        Ok(IperfResult {
            bits_per_second: recv,
            sender_bits_per_second: sender,
            lost_percent: Some(f(sum, "lost_percent").unwrap_or(0.0)),
            retransmits: None,
        })
    } else {
        let recv = f(end.get("sum_received"), "bits_per_second")
            .ok_or_else(|| anyhow!("no end.sum_received.bits_per_second"))?;
        let sent = end.get("sum_sent");
        Ok(IperfResult {
            bits_per_second: recv,
            sender_bits_per_second: f(sent, "bits_per_second").unwrap_or(recv),
            lost_percent: None,
            retransmits: sent.and_then(|s| s.get("retransmits")).and_then(|x| x.as_u64()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP_JSON: &str = r#"{"start":{},"intervals":[],"end":{"streams":[],
        "sum_sent":{"bits_per_second":2.0e9,"retransmits":3,"sender":true},
        "sum_received":{"bits_per_second":1.9e9,"sender":true}}}"#;
    const UDP_JSON: &str = r#"{"end":{"sum":{"bits_per_second":3.0e8,"lost_percent":1.5,"sender":true},
        "sum_received":{"bits_per_second":2.9e8,"sender":false}}}"#;

    #[test]
    fn parses_iperf_tcp_and_udp() {
        let t = parse_iperf(TCP_JSON, false).unwrap();
        assert_eq!(t.bits_per_second, 1.9e9);
        assert_eq!(t.sender_bits_per_second, 2.0e9);
        assert_eq!(t.retransmits, Some(3));
        let u = parse_iperf(UDP_JSON, true).unwrap();
        assert_eq!(u.bits_per_second, 2.9e8);
        assert_eq!(u.lost_percent, Some(1.5));
        let old = r#"{"end":{"sum":{"bits_per_second":3.0e8,"lost_percent":0}}}"#;
        assert_eq!(parse_iperf(old, true).unwrap().bits_per_second, 3.0e8);
        let err = parse_iperf(r#"{"error":"unable to connect"}"#, false).unwrap_err();
        assert!(err.to_string().contains("unable to connect"));
    }
}
