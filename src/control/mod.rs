//! The control protocol between `run` and the commands that talk to it
//! (`status`, `flows`, `reload`): one JSON request line per connection, one
//! JSON reply, `{"ok": ...}` or `{"error": "..."}`, over an abstract unix
//! socket (it belongs to the network namespace, the scope of one engine).
//! Both ends check the other's credentials (`peer`); SECURITY.md says why.

mod client;
mod peer;
mod server;
pub mod view;

use serde::{Deserialize, Serialize};

pub use client::Client;
pub use peer::{authorize, Peer};
pub use server::ControlServer;
pub use view::{FlowView, HostView, IfaceStatus, KernelView, NotOffloadedView, RatesView, SlowView, Status, TupleView};

/// The socket's abstract name.
const NAME: &[u8] = b"nft-offload.ctl";

/// Largest ruleset a reload may carry, bytes (firewall4's largest real-world
/// rulesets are a few hundred KiB; sets with many elements stay well below).
pub const MAX_RULESET: usize = 4 * 1024 * 1024;

/// Longest request line accepted, bytes: the ruleset JSON-escaped (at most
/// doubled: tabs, newlines and quotes take two bytes) and the envelope.
const MAX_REQUEST: usize = 2 * MAX_RULESET + 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Status,
    Flows,
    /// The connections on the kernel's path, with why.
    SlowFlows,
    Hosts,
    /// Replace the ruleset of `run --nft` with `ruleset`, which the client
    /// read itself; `name` (the client's path) only labels messages. The
    /// engine never opens a file for a client: see `policy::nft::Source`.
    Reload {
        name: String,
        ruleset: String,
    },
    /// Read the files the engine was started with again (`--config`, the
    /// ruleset), as SIGHUP does: the engine reads only what root named at
    /// its start.
    ReloadFiles,
}

/// What the engine answers, inside the `ok` of the envelope.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Response {
    Status(Box<Status>),
    Flows(Vec<FlowView>),
    Hosts(Vec<HostView>),
    Slow(Vec<SlowView>),
    /// A one-line summary of what a reload did.
    Done(String),
}

/// The reply envelope, for every request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Envelope<T> {
    Ok(T),
    Error(String),
}

/// Decode one request line; errors are what the client is told.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let r: Request = serde_json::from_str(line.trim()).map_err(|e| format!("malformed request: {e}"))?;
    if let Request::Reload { ruleset, .. } = &r {
        check_ruleset_size(ruleset.len())?;
    }
    Ok(r)
}

/// The ruleset bound, for both ends (the client checks before sending).
pub fn check_ruleset_size(len: usize) -> Result<(), String> {
    if len > MAX_RULESET {
        return Err(format!("the ruleset is {len} bytes; a reload carries at most {MAX_RULESET} bytes (4 MiB)"));
    }
    Ok(())
}

/// Encode the reply to one request.
pub fn encode_reply(r: &Result<Response, String>) -> String {
    let env = match r {
        Ok(v) => Envelope::Ok(v),
        Err(e) => Envelope::Error(e.clone()),
    };
    serde_json::to_string(&env).unwrap_or_else(|e| format!("{{\"error\":\"cannot encode the reply: {e}\"}}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_ones_are_named() {
        for (r, wire) in [
            (Request::Status, r#"{"request":"status"}"#),
            (Request::Flows, r#"{"request":"flows"}"#),
            (
                Request::Reload { name: "/etc/fw.nft".into(), ruleset: "table inet t {\n}\n".into() },
                r#"{"request":"reload","name":"/etc/fw.nft","ruleset":"table inet t {\n}\n"}"#,
            ),
        ] {
            assert_eq!(serde_json::to_string(&r).unwrap(), wire);
            assert_eq!(parse_request(wire), Ok(r));
        }
        let old_reload = r#"{"request":"reload","path":"/etc/fw.nft"}"#;
        for bad in ["status", r#"{"request":"shutdown"}"#, r#"{"request":"reload"}"#, old_reload, ""] {
            let e = parse_request(bad).unwrap_err();
            assert!(e.starts_with("malformed request: "), "{bad}: {e}");
        }
    }

    #[test]
    fn rulesets_are_bounded() {
        let big = "#".repeat(MAX_RULESET + 1);
        let line = serde_json::to_string(&Request::Reload { name: "big".into(), ruleset: big }).unwrap();
        let e = parse_request(&line).unwrap_err();
        assert!(e.contains("at most 4194304 bytes"), "{e}");
        // the largest ruleset fits the line bound even fully escaped
        let worst = "\t".repeat(MAX_RULESET);
        let line = serde_json::to_string(&Request::Reload { name: "x".into(), ruleset: worst }).unwrap();
        assert!(line.len() <= MAX_REQUEST, "{} > {MAX_REQUEST}", line.len());
        assert!(parse_request(&line).is_ok());
    }

    #[test]
    fn envelope() {
        assert_eq!(encode_reply(&Ok(Response::Done("reloaded".into()))), r#"{"ok":"reloaded"}"#);
        assert_eq!(encode_reply(&Err("no ruleset".into())), r#"{"error":"no ruleset"}"#);
        let back: Envelope<String> = serde_json::from_str(r#"{"ok":"x"}"#).unwrap();
        assert!(matches!(back, Envelope::Ok(s) if s == "x"));
    }
}
