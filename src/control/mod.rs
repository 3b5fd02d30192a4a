//! The control protocol between `run` and the commands that talk to it
//! (`status`, `flows`, `reload`): one JSON request line per connection, one
//! JSON reply, `{"ok": ...}` or `{"error": "..."}`, over an abstract unix
//! socket (it belongs to the network namespace, the scope of one engine).

mod client;
mod server;
pub mod view;

use serde::{Deserialize, Serialize};

pub use client::Client;
pub use server::ControlServer;
pub use view::{FlowView, IfaceStatus, Status, TupleView};

/// The socket's abstract name.
const NAME: &[u8] = b"nft-offload.ctl";

/// Longest request accepted, bytes: a path or a command, never more.
const MAX_REQUEST: u64 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Status,
    Flows,
    /// Replace the ruleset of `run --nft` with the file at `path`.
    Reload {
        path: std::path::PathBuf,
    },
}

/// What the engine answers, inside the `ok` of the envelope.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Response {
    Status(Box<Status>),
    Flows(Vec<FlowView>),
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
    serde_json::from_str(line.trim()).map_err(|e| format!("malformed request: {e}"))
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
            (Request::Reload { path: "/etc/fw.nft".into() }, r#"{"request":"reload","path":"/etc/fw.nft"}"#),
        ] {
            assert_eq!(serde_json::to_string(&r).unwrap(), wire);
            assert_eq!(parse_request(wire), Ok(r));
        }
        for bad in ["status", r#"{"request":"shutdown"}"#, r#"{"request":"reload"}"#, ""] {
            let e = parse_request(bad).unwrap_err();
            assert!(e.starts_with("malformed request: "), "{bad}: {e}");
        }
    }

    #[test]
    fn envelope() {
        assert_eq!(encode_reply(&Ok(Response::Done("reloaded".into()))), r#"{"ok":"reloaded"}"#);
        assert_eq!(encode_reply(&Err("no ruleset".into())), r#"{"error":"no ruleset"}"#);
        let back: Envelope<String> = serde_json::from_str(r#"{"ok":"x"}"#).unwrap();
        assert!(matches!(back, Envelope::Ok(s) if s == "x"));
    }
}
