//! ctnetlink: follows the kernel's conntrack table over NETLINK_NETFILTER.
//!
//! * `nla`: raw netlink framing and attribute codec.
//! * `msg`: conntrack entries/events, the decoder for kernel messages and
//!   builders for dump, update and delete requests.
//! * `socket`: `CtSocket`, an event listener or a request socket.
//! * `batch`: many update requests in one send, replies by sequence.
//!
//! Message formats mirror net/netfilter/nf_conntrack_netlink.c; the
//! netlink codec is hand-rolled on libc sockets.

pub mod batch;
pub mod merge;
pub mod msg;
pub mod nla;
pub mod socket;

pub use merge::{merge, Memo, Seen};
pub use msg::{
    build_delete, build_dump_request, build_update, parse_message, parse_message_with_header, parse_request, status,
    tcp_state, CtAttrs, CtEntry, CtEvent, CtTuple, CtUpdate, ParsedMsg, RawCtMsg, IP_CT_TCP_FLAG_BE_LIBERAL,
};
pub use nla::NlHeader;
pub use socket::{decode_events, CtBatch, CtError, CtSocket};
