//! Reading the whole flow map in batches (keepalive, when most of it is
//! due at once).

use anyhow::{bail, Result};
use std::os::fd::AsFd;

use super::{fo_flow, fo_flow_key, Dataplane};

impl Dataplane {
    /// Every fast-path entry, up to `chunk` keys and values per
    /// BPF_MAP_LOOKUP_BATCH (one syscall per chunk, not per key), handed to
    /// `f`. A hash map's batch ends at a bucket boundary, so one may return
    /// fewer than asked before the end (`__htab_map_lookup_and_delete_batch`,
    /// kernel/bpf/hashtab.c; libbpf-rs's iterator takes that for the end);
    /// the walk ends on ENOENT, and a bucket larger than the chunk (ENOSPC)
    /// is read again with room for it. Entries changed meanwhile may be
    /// seen old or not at all, so a caller looks up what it missed.
    pub fn for_each_flow(&self, chunk: usize, mut f: impl FnMut(fo_flow_key, fo_flow)) -> Result<()> {
        use std::os::fd::AsRawFd;
        let fd = self.skel.maps.fo_flows.as_fd().as_raw_fd();
        let opts = libbpf_sys::bpf_map_batch_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_map_batch_opts>() as _,
            ..Default::default()
        };
        let mut room = chunk.max(1);
        let (mut keys, mut vals) = (vec![fo_flow_key::default(); room], vec![fo_flow::default(); room]);
        // The batch position: the next bucket, a u32 for hash maps.
        let (mut at, mut next, mut first) = (0u64, 0u64, true);
        loop {
            let mut count = room as u32;
            // SAFETY: keys and vals hold `count` entries of the map's key
            // and value types; the positions are 8 bytes, more than the u32
            // a hash map reads and writes.
            let rc = unsafe {
                libbpf_sys::bpf_map_lookup_batch(
                    fd,
                    if first { std::ptr::null_mut() } else { (&mut at as *mut u64).cast() },
                    (&mut next as *mut u64).cast(),
                    keys.as_mut_ptr().cast(),
                    vals.as_mut_ptr().cast(),
                    &mut count,
                    &opts,
                )
            };
            match -rc {
                0 | libc::ENOENT => {}
                libc::ENOSPC if count == 0 => {
                    room *= 2;
                    keys.resize(room, fo_flow_key::default());
                    vals.resize(room, fo_flow::default());
                    continue;
                }
                e => bail!("reading fo_flows in batches: {}", std::io::Error::from_raw_os_error(e)),
            }
            let n = (count as usize).min(room);
            keys[..n].iter().zip(&vals[..n]).for_each(|(k, v)| f(*k, *v));
            if -rc == libc::ENOENT {
                return Ok(());
            }
            (at, first) = (next, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::key_bytes;

    fn key(i: u32) -> fo_flow_key {
        fo_flow_key {
            ifindex: 1 + i % 3,
            family: 2,
            proto: 17,
            sport: i as u16,
            dport: (i >> 16) as u16,
            ..Default::default()
        }
    }

    /// The batched walk returns every entry once, with its value, whatever
    /// the chunk (here smaller and larger than the map).
    #[test]
    fn for_each_flow_walks_every_entry_once() {
        let dp = Dataplane::load(512).expect("loading the fast path");
        let entries: Vec<_> =
            (0..700u32).map(|i| (key(i), fo_flow { new_sport: i as u16, ..Default::default() })).collect();
        assert_eq!(dp.put_new_flows(&entries), (700, None));
        for chunk in [1, 7, 64, 4096] {
            let mut seen = std::collections::HashMap::new();
            dp.for_each_flow(chunk, |k, v| assert!(seen.insert(key_bytes(&k), v.new_sport).is_none(), "twice"))
                .unwrap();
            assert_eq!(seen.len(), 700, "chunk {chunk}");
            assert!(entries.iter().all(|(k, v)| seen.get(&key_bytes(k)) == Some(&v.new_sport)), "chunk {chunk}");
        }
    }
}
