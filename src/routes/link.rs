//! Facts about one network interface, read from sysfs and ethtool.

use std::ffi::CString;
use std::fs;

use anyhow::{bail, Result};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LinkInfo {
    pub name: String,
    pub ifindex: u32,
    pub up: bool,
    pub driver: String,
    pub mtu: u32,
    /// Root egress qdisc kind ("noqueue", "fq_codel", "htb", ...).
    pub qdisc: String,
}

pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

pub fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buffer of IF_NAMESIZE as required.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated string.
    Some(unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

fn sysfs(name: &str, attr: &str) -> Option<String> {
    fs::read_to_string(format!("/sys/class/net/{name}/{attr}")).ok().map(|s| s.trim().to_string())
}

/// Driver name via ETHTOOL_GDRVINFO ("veth", "mlx5_core", ...).
pub fn driver(name: &str) -> String {
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    // SAFETY: zeroed plain structs, ioctl with a correctly sized request.
    unsafe {
        let mut info: DrvInfo = std::mem::zeroed();
        info.cmd = ETHTOOL_GDRVINFO;
        let mut req: IfReq = std::mem::zeroed();
        let n = name.len().min(15);
        req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        req.data = &mut info;
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return String::new();
        }
        let r = libc::ioctl(fd, SIOCETHTOOL as _, &mut req);
        libc::close(fd);
        if r < 0 {
            return String::new();
        }
        let end = info.driver.iter().position(|&c| c == 0).unwrap_or(32);
        String::from_utf8_lossy(&info.driver[..end]).into_owned()
    }
}

/// Root qdisc kind, from `tc -j qdisc show dev IF`.
pub fn root_qdisc(name: &str) -> String {
    let out = std::process::Command::new("tc").args(["-j", "qdisc", "show", "dev", name]).output();
    let Ok(out) = out else { return String::new() };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .and_then(|a| a.iter().find(|q| q.get("root").and_then(|r| r.as_bool()).unwrap_or(false)))
        .and_then(|q| q.get("kind").and_then(|k| k.as_str()))
        .unwrap_or("")
        .to_string()
}

pub fn info(name: &str) -> Result<LinkInfo> {
    let Some(ifindex) = ifindex(name) else {
        bail!("interface {name} does not exist in this network namespace");
    };
    let flags =
        sysfs(name, "flags").and_then(|f| u32::from_str_radix(f.trim_start_matches("0x"), 16).ok()).unwrap_or(0);
    let carrier = sysfs(name, "carrier").map(|c| c == "1").unwrap_or(false);
    Ok(LinkInfo {
        name: name.to_string(),
        ifindex,
        up: flags & 1 != 0 && carrier,
        driver: driver(name),
        mtu: sysfs(name, "mtu").and_then(|m| m.parse().ok()).unwrap_or(1500),
        qdisc: root_qdisc(name),
    })
}

/// Qdiscs that shape or schedule: with one of these on egress, XDP
/// redirect would bypass it, so auto mode picks TC (keeps SQM working).
pub fn is_shaper(qdisc: &str) -> bool {
    !matches!(qdisc, "" | "noqueue" | "pfifo_fast" | "mq" | "fq_codel" | "pfifo" | "bfifo" | "fq")
}

/// Drivers that are software devices (veth, bridges, tunnels): XDP on
/// them either runs in generic mode or has pitfalls (veth needs NAPI on the
/// peer and loses CHECKSUM_PARTIAL metadata), and TC measured cheaper.
pub fn is_virtual(driver: &str) -> bool {
    matches!(
        driver,
        "veth"
            | "bridge"
            | "tun"
            | "vxlan"
            | "wireguard"
            | "ppp"
            | "802.1Q VLAN Support"
            | "bonding"
            | "dummy"
            | "macvlan"
            | "ipvlan"
            | "ifb"
            | "geneve"
            | "gre"
            | "ip_gre"
            | "ip6_gre"
            | "ipip"
            | "sit"
            | "nlmon"
            | "team"
            | ""
    )
}
