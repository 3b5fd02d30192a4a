//! The legacy x_tables rulesets (iptables-legacy, ip6tables-legacy,
//! arptables-legacy, ebtables-legacy): they send no notification at all
//! (no nfnetlink group; `xt_replace_table` and `do_replace` in ebtables.c
//! tell nobody), so, unlike nf_tables (`watch`), their changes are polled.
//! A change is treated like an nftables one: every offloaded connection goes
//! back through the kernel, and the evidence gathered before it is void.
//!
//! Which tables exist in this namespace: /proc/net/ip_tables_names,
//! ip6_tables_names, arp_tables_names (`xt_table_seq_show`: the tables
//! instantiated here, so reading them loads and creates nothing). ebtables
//! has no such list: its tables are asked for by name only while their
//! module is loaded (/sys/module/ebtable_NAME), because asking for a table
//! loads its module (`find_table_lock`, `request_module`) and creates it in
//! the namespace; a loaded module's table, created here by our question, is
//! empty with ACCEPT policies (nothing changes for packets).
//!
//! A table is read as iptables-save reads it (`IPT_SO_GET_INFO`, then
//! `IPT_SO_GET_ENTRIES`; the ip6t, arpt and ebt equivalents) and kept as a
//! hash of its entries with their counters zeroed (the counters move with
//! every packet; everything else moves only with the rules: the kernel
//! writes match and target names back over its pointers,
//! `xt_data_to_user`, `ebt_obj_to_user`).

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// One x_tables family: where its tables are listed and how its entries
/// are laid out (offsets from the uapi headers, x86_64 and every 64-bit
/// ABI alike: `struct ipt_entry` and the others hold u64 counters, so they
/// are 8-aligned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Family {
    name: &'static str,
    /// The file listing its tables in this thread's namespace (None:
    /// ebtables); /proc/net would be the main thread's.
    names: Option<&'static str>,
    domain: libc::c_int,
    level: libc::c_int,
    /// *_SO_GET_INFO and *_SO_GET_ENTRIES.
    get_info: libc::c_int,
    get_entries: libc::c_int,
    /// sizeof(struct *_getinfo) and the offset of its `size`.
    info_len: usize,
    info_size_at: usize,
    /// In one entry: where `next_offset` (u16) and `counters` (16 bytes) are.
    next_at: usize,
    counters_at: usize,
}

/// `struct *_get_entries`: name[32], size, then the entries (8-aligned).
const ENTRIES_AT: usize = 40;

const IPV4: Family = Family {
    name: "ip",
    names: Some("/proc/thread-self/net/ip_tables_names"),
    domain: libc::AF_INET,
    level: libc::SOL_IP,
    get_info: 64,
    get_entries: 65,
    info_len: 84,
    info_size_at: 80,
    next_at: 90,
    counters_at: 96,
};

const IPV6: Family = Family {
    name: "ip6",
    names: Some("/proc/thread-self/net/ip6_tables_names"),
    domain: libc::AF_INET6,
    level: libc::SOL_IPV6,
    get_info: 64,
    get_entries: 65,
    info_len: 84,
    info_size_at: 80,
    next_at: 142,
    counters_at: 152,
};

const ARP: Family = Family {
    name: "arp",
    names: Some("/proc/thread-self/net/arp_tables_names"),
    domain: libc::AF_INET,
    level: libc::SOL_IP,
    get_info: 96,
    get_entries: 97,
    info_len: 68,
    info_size_at: 64,
    next_at: 166,
    counters_at: 176,
};

/// ebtables: `struct ebt_replace` for both requests; entries carry no
/// counters (they are a separate array, not asked for).
const BRIDGE: Family = Family {
    name: "bridge",
    names: None,
    domain: libc::AF_INET,
    level: libc::SOL_IP,
    get_info: 128,
    get_entries: 129,
    info_len: EBT_REPLACE_LEN,
    info_size_at: 40,
    next_at: 0,
    counters_at: 0,
};

/// sizeof(struct ebt_replace); offsets of nentries, entries_size,
/// num_counters and the entries pointer.
const EBT_REPLACE_LEN: usize = 120;
const EBT_NENTRIES_AT: usize = 36;
const EBT_NUM_COUNTERS_AT: usize = 96;
const EBT_ENTRIES_PTR_AT: usize = 112;
const EBT_TABLES: [&str; 3] = ["filter", "nat", "broute"];

/// Every legacy table of this namespace, by "family table" ("ip filter"):
/// the hash of its rules, or why it could not be read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot(pub BTreeMap<String, Result<u64, String>>);

impl Snapshot {
    /// The tables that differ from `before` (added, removed, changed).
    pub fn changed(&self, before: &Snapshot) -> Vec<String> {
        let names: std::collections::BTreeSet<&String> = self.0.keys().chain(before.0.keys()).collect();
        names.into_iter().filter(|n| self.0.get(*n) != before.0.get(*n)).cloned().collect()
    }
}

/// Read every legacy table of this namespace.
pub fn read() -> Snapshot {
    let mut out = BTreeMap::new();
    for fam in [IPV4, IPV6, ARP, BRIDGE] {
        for table in table_names(&fam) {
            let h = read_table(&fam, &table).map(|b| fingerprint(&fam, b)).map_err(|e| e.to_string());
            out.insert(format!("{} {table}", fam.name), h);
        }
    }
    Snapshot(out)
}

fn table_names(fam: &Family) -> Vec<String> {
    match fam.names {
        Some(path) => std::fs::read_to_string(path).map(|s| parse_names(&s)).unwrap_or_default(),
        None => EBT_TABLES
            .iter()
            .filter(|t| std::path::Path::new(&format!("/sys/module/ebtable_{t}")).exists())
            .map(|t| t.to_string())
            .collect(),
    }
}

/// One table name a line (`xt_table_seq_show`).
fn parse_names(s: &str) -> Vec<String> {
    s.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect()
}

fn getsockopt(fd: &OwnedFd, fam: &Family, opt: libc::c_int, buf: &mut [u8]) -> io::Result<usize> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: buf is valid for len bytes; the kernel writes at most len.
    let rc = unsafe { libc::getsockopt(fd.as_raw_fd(), fam.level, opt, buf.as_mut_ptr().cast(), &mut len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(len as usize)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The table's entries as the kernel copies them out (counters included
/// for x_tables; the ebtables header fields that say what they are first).
/// A table replaced between the two requests answers EAGAIN (x_tables) or
/// EINVAL (ebtables: sizes no longer match): asked again.
fn read_table(fam: &Family, table: &str) -> io::Result<Vec<u8>> {
    // SAFETY: plain socket(2); the result is checked.
    let raw = unsafe { libc::socket(fam.domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_RAW) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let name = table.as_bytes();
    if name.len() >= 32 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "table name too long"));
    }
    let mut last = io::Error::other("changed while read");
    for _ in 0..5 {
        let mut info = vec![0u8; fam.info_len];
        info[..name.len()].copy_from_slice(name);
        getsockopt(&fd, fam, fam.get_info, &mut info)?;
        let size = u32_at(&info, fam.info_size_at) as usize;
        let r = if fam.names.is_none() { ebt_entries(&fd, fam, &info, size) } else { xt_entries(&fd, fam, name, size) };
        match r {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINVAL)) => last = e,
            r => return r,
        }
    }
    Err(last)
}

fn xt_entries(fd: &OwnedFd, fam: &Family, name: &[u8], size: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; ENTRIES_AT + size];
    buf[..name.len()].copy_from_slice(name);
    buf[32..36].copy_from_slice(&(size as u32).to_ne_bytes());
    getsockopt(fd, fam, fam.get_entries, &mut buf)?;
    Ok(buf.split_off(ENTRIES_AT))
}

/// ebtables: the entries go where the request's pointer says; no counters
/// (num_counters 0). The header's counts lead the result.
fn ebt_entries(fd: &OwnedFd, fam: &Family, info: &[u8], size: usize) -> io::Result<Vec<u8>> {
    let mut entries = vec![0u8; size];
    let mut req = info.to_vec();
    req[EBT_NUM_COUNTERS_AT..EBT_NUM_COUNTERS_AT + 4].copy_from_slice(&0u32.to_ne_bytes());
    let ptr = entries.as_mut_ptr() as usize as u64;
    req[EBT_ENTRIES_PTR_AT..EBT_ENTRIES_PTR_AT + 8].copy_from_slice(&ptr.to_ne_bytes());
    // The kernel wants the length of the header and the entries it copies.
    req.resize(EBT_REPLACE_LEN + size, 0);
    getsockopt(fd, fam, fam.get_entries, &mut req)?;
    let mut out = req[32..EBT_NENTRIES_AT + 8].to_vec();
    out.extend(entries);
    Ok(out)
}

/// The entries' hash with every entry's counters zeroed (x_tables; the
/// ebtables entries hold none).
fn fingerprint(fam: &Family, mut blob: Vec<u8>) -> u64 {
    if fam.names.is_some() {
        let mut at = 0;
        while at + fam.counters_at + 16 <= blob.len() {
            blob[at + fam.counters_at..at + fam.counters_at + 16].fill(0);
            let next = u16::from_ne_bytes([blob[at + fam.next_at], blob[at + fam.next_at + 1]]) as usize;
            if next == 0 {
                break;
            }
            at += next;
        }
    }
    let mut h = DefaultHasher::new();
    blob.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two fake ipt entries of 152 bytes each (112 + a 40-byte target):
    /// counters at 96, next_offset at 90.
    fn entries(rule: u8, counters: u64) -> Vec<u8> {
        let mut v = Vec::new();
        for i in 0..2u8 {
            let mut e = vec![0u8; 152];
            e[0] = rule + i;
            e[88..90].copy_from_slice(&112u16.to_ne_bytes());
            e[90..92].copy_from_slice(&152u16.to_ne_bytes());
            e[96..104].copy_from_slice(&counters.to_ne_bytes());
            e[104..112].copy_from_slice(&(counters * 100).to_ne_bytes());
            v.extend(e);
        }
        v
    }

    #[test]
    fn counters_are_not_a_change_rules_are() {
        let base = fingerprint(&IPV4, entries(1, 0));
        assert_eq!(fingerprint(&IPV4, entries(1, 12345)), base, "packets counted");
        assert_ne!(fingerprint(&IPV4, entries(2, 0)), base, "a rule changed");
        let mut longer = entries(1, 0);
        longer.extend(vec![0u8; 8]);
        assert_ne!(fingerprint(&IPV4, longer), base);
        // A corrupt next_offset ends the walk instead of looping.
        let mut zero = entries(1, 7);
        zero[90..92].copy_from_slice(&0u16.to_ne_bytes());
        fingerprint(&IPV4, zero);
    }

    #[test]
    fn names_and_changes() {
        assert_eq!(parse_names("filter\nnat\n\n"), vec!["filter", "nat"]);
        let s =
            |v: &[(&str, Result<u64, String>)]| Snapshot(v.iter().map(|(k, h)| (k.to_string(), h.clone())).collect());
        let before = s(&[("ip filter", Ok(1)), ("ip nat", Ok(2))]);
        let now = s(&[("ip filter", Ok(1)), ("ip nat", Ok(3)), ("arp filter", Err("denied".into()))]);
        assert_eq!(now.changed(&before), vec!["arp filter", "ip nat"]);
        assert!(before.changed(&before).is_empty());
    }

    /// This namespace's own tables, read for real (root, in a private
    /// namespace): a table that exists reads, and a rule written by the
    /// kernel's own replace (done here by iptables-legacy when installed)
    /// changes it. Without iptables-legacy only the reading is checked.
    #[test]
    fn a_fresh_namespace_reads_its_tables() {
        // SAFETY: affects only this test's thread.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare(CLONE_NEWNET) needs root");
        let empty = read();
        assert!(empty.0.values().all(|h| h.is_ok()), "{empty:?}");
        let ipt = |args: &[&str]| {
            std::process::Command::new("iptables-legacy").args(args).stdout(std::process::Stdio::null()).status()
        };
        let Ok(st) = ipt(&["-w", "-L", "FORWARD", "-n"]) else { return };
        assert!(st.success());
        let listed = read();
        assert!(listed.0.get("ip filter").is_some_and(|h| h.is_ok()), "{listed:?}");
        assert_eq!(read(), listed, "stable while nothing changes");
        assert!(ipt(&["-w", "-I", "FORWARD", "-d", "192.0.2.1", "-j", "DROP"]).unwrap().success());
        assert_eq!(read().changed(&listed), vec!["ip filter"]);
    }
}
