//! One rtnetlink dump (NLM_F_DUMP) as decoded messages: the rules and
//! address tables are read this way at start and after each change event.

use std::io;

use anyhow::{anyhow, bail, Context, Result};
use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

const DUMP_SEQ: u32 = 1;

/// Every message the kernel answers `request` (a Get* message) with. A dump
/// interrupted by a concurrent change (NLM_F_DUMP_INTR) is repeated.
pub fn dump(request: RouteNetlinkMessage, what: &str) -> Result<Vec<RouteNetlinkMessage>> {
    dump_map(request, what, |m| match m {
        Ok(m) => Ok(Some(m)),
        Err(_) => bail!("undecodable reply"),
    })
}

/// `dump`, each reply message handed to `take`: decoded, or as its raw
/// bytes (header included) when netlink-packet-route cannot decode it.
pub fn dump_map<T>(
    request: RouteNetlinkMessage,
    what: &str,
    mut take: impl FnMut(std::result::Result<RouteNetlinkMessage, &[u8]>) -> Result<Option<T>>,
) -> Result<Vec<T>> {
    for _ in 0..3 {
        if let (msgs, false) =
            dump_once(request.clone(), &mut take).with_context(|| format!("rtnetlink {what} dump"))?
        {
            return Ok(msgs);
        }
    }
    bail!("rtnetlink {what} dump: interrupted by concurrent changes three times in a row")
}

type Take<'a, T> = dyn FnMut(std::result::Result<RouteNetlinkMessage, &[u8]>) -> Result<Option<T>> + 'a;

fn dump_once<T>(request: RouteNetlinkMessage, take: &mut Take<'_, T>) -> Result<(Vec<T>, bool)> {
    let mut msg = NetlinkMessage::new(NetlinkHeader::default(), request.into());
    msg.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    msg.header.sequence_number = DUMP_SEQ;
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    let (mut out, mut intr) = (Vec::new(), false);
    exchange(&buf, |datagram| absorb(datagram, &mut out, &mut intr, take))?;
    Ok((out, intr))
}

/// Send `request` on a fresh rtnetlink socket and hand each reply datagram
/// to `take` until it says the dump is done.
pub fn exchange(request: &[u8], take: impl FnMut(&[u8]) -> Result<bool>) -> Result<()> {
    exchange_on(NETLINK_ROUTE, request, take)
}

/// The payloads of the messages in `datagram` answering sequence number
/// `seq` (a request's own answers, not a dump's).
pub fn answers(mut datagram: &[u8], seq: u32) -> Result<Vec<NetlinkPayload<RouteNetlinkMessage>>> {
    let mut out = Vec::new();
    while !datagram.is_empty() {
        let nl = NetlinkBuffer::new_checked(datagram).map_err(|e| anyhow!("undecodable reply: {e}"))?;
        let len = nl.length() as usize;
        let (one, this) = (&datagram[..len], nl.sequence_number());
        datagram = &datagram[len.next_multiple_of(4).min(datagram.len())..];
        if this == seq {
            out.push(
                NetlinkMessage::<RouteNetlinkMessage>::deserialize(one)
                    .map_err(|e| anyhow!("undecodable answer: {e}"))?
                    .payload,
            );
        }
    }
    Ok(out)
}

/// [`exchange`] on a netlink family of choice (nfnetlink for nf_tables;
/// `xfrm` dumps NETLINK_XFRM).
pub fn exchange_on(protocol: isize, request: &[u8], mut take: impl FnMut(&[u8]) -> Result<bool>) -> Result<()> {
    let mut sock = Socket::new(protocol)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    sock.send(request, 0)?;
    loop {
        let datagram = match sock.recv_from_full() {
            Ok((d, _)) => d,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if datagram.is_empty() {
            bail!("netlink socket closed before the dump was done");
        }
        if take(&datagram)? {
            return Ok(());
        }
    }
}

/// Take the replies in one datagram; true when the dump is done.
fn absorb<T>(mut datagram: &[u8], out: &mut Vec<T>, intr: &mut bool, take: &mut Take<'_, T>) -> Result<bool> {
    while !datagram.is_empty() {
        let nl = NetlinkBuffer::new_checked(datagram).map_err(|e| anyhow!("undecodable reply: {e}"))?;
        let (len, flags, seq) = (nl.length() as usize, nl.flags(), nl.sequence_number());
        let msg = &datagram[..len];
        datagram = &datagram[len.next_multiple_of(4).min(datagram.len())..];
        if seq != DUMP_SEQ {
            continue;
        }
        *intr |= flags & NLM_F_DUMP_INTR != 0;
        let m = match NetlinkMessage::<RouteNetlinkMessage>::deserialize(msg) {
            Ok(m) => m,
            Err(e) => {
                out.extend(take(Err(msg)).map_err(|x| anyhow!("{x}: {e}"))?);
                continue;
            }
        };
        match m.payload {
            NetlinkPayload::InnerMessage(m) => out.extend(take(Ok(m))?),
            NetlinkPayload::Done(d) if d.code != 0 => return Err(io::Error::from_raw_os_error(d.code.abs()).into()),
            NetlinkPayload::Done(_) => return Ok(true),
            NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io().into()),
            _ => {}
        }
    }
    Ok(false)
}
