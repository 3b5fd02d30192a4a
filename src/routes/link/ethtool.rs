//! The two interface facts rtnetlink does not carry, through the ethtool
//! ioctl (SIOCETHTOOL): the driver name and whether GRO is on. The ioctl goes
//! to a socket of the calling thread's network namespace, so like the link
//! dump it is right wherever the thread is (sysfs would show the namespace
//! /sys was mounted in).

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x3;
const ETHTOOL_GGRO: u32 = 0x2b;

/// struct ethtool_drvinfo (include/uapi/linux/ethtool.h).
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

/// struct ethtool_value.
#[repr(C)]
struct Value {
    cmd: u32,
    data: u32,
}

/// One SIOCETHTOOL request on `name`; `data` starts with the command word.
/// False when the interface does not exist or the driver does not answer.
///
/// # Safety
/// `T` must be the ethtool struct the command in it expects.
unsafe fn ethtool<T>(name: &str, data: &mut T) -> bool {
    ethtool_ptr(name, (data as *mut T).cast())
}

/// # Safety
/// `data` must point at the ethtool struct (and trailing data) the command
/// in its first word expects.
unsafe fn ethtool_ptr(name: &str, data: *mut libc::c_void) -> bool {
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IF_NAMESIZE],
        data: *mut libc::c_void,
        _pad: [u8; 16],
    }
    let mut req = IfReq { name: [0; libc::IF_NAMESIZE], data, _pad: [0; 16] };
    let n = name.len().min(libc::IF_NAMESIZE - 1);
    req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
    if fd < 0 {
        return false;
    }
    let r = libc::ioctl(fd, SIOCETHTOOL as _, &mut req);
    libc::close(fd);
    r >= 0
}

/// Driver name via ETHTOOL_GDRVINFO ("veth", "mlx5_core", ...); empty when
/// the interface has no ethtool support (or does not exist).
pub fn driver(name: &str) -> String {
    // SAFETY: a zeroed plain struct of the size ETHTOOL_GDRVINFO fills.
    unsafe {
        let mut info: DrvInfo = std::mem::zeroed();
        info.cmd = ETHTOOL_GDRVINFO;
        if !ethtool(name, &mut info) {
            return String::new();
        }
        let end = info.driver.iter().position(|&c| c == 0).unwrap_or(info.driver.len());
        String::from_utf8_lossy(&info.driver[..end]).into_owned()
    }
}

/// Whether generic receive offload is on (ETHTOOL_GGRO, the active feature
/// `ethtool -k` shows as generic-receive-offload); None when not readable.
pub fn gro(name: &str) -> Option<bool> {
    let mut v = Value { cmd: ETHTOOL_GGRO, data: 0 };
    // SAFETY: ETHTOOL_GGRO reads and writes a struct ethtool_value.
    unsafe { ethtool(name, &mut v) }.then_some(v.data != 0)
}

const ETHTOOL_GFLAGS: u32 = 0x25;
/// include/uapi/linux/ethtool.h: NETIF_F_HW_VLAN_CTAG_RX as a flag.
const ETH_FLAG_RXVLAN: u32 = 1 << 8;

/// Whether the NIC strips 802.1Q tags into packet metadata on receive
/// (`ethtool -k` rx-vlan-offload): XDP then sees tagged frames untagged.
/// None when not readable.
pub fn rx_vlan_offload(name: &str) -> Option<bool> {
    let mut v = Value { cmd: ETHTOOL_GFLAGS, data: 0 };
    // SAFETY: ETHTOOL_GFLAGS reads and writes a struct ethtool_value.
    unsafe { ethtool(name, &mut v) }.then_some(v.data & ETH_FLAG_RXVLAN != 0)
}

const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSSET_INFO: u32 = 0x37;
const ETHTOOL_GFEATURES: u32 = 0x3a;
/// enum ethtool_stringset: the names of the device features.
const ETH_SS_FEATURES: u32 = 4;
const ETH_GSTRING_LEN: usize = 32;

/// Whether each feature in `wanted` (by the name `ethtool -k` shows in its
/// `-K` form: "tx-vlan-hw-insert", "rx-vlan-hw-parse", "rx-gro", ...) is
/// active on `name`, None per feature the kernel does not know. The bit a
/// name stands for is the kernel's own numbering (netdev_features.h), not
/// ABI: it is looked up in the ETH_SS_FEATURES string set, as ethtool(8)
/// does. None when the device does not answer.
pub fn features(name: &str, wanted: &[&str]) -> Option<Vec<Option<bool>>> {
    // struct ethtool_sset_info: cmd, reserved, sset_mask (u64), data[1].
    let mut info = [0u32; 5];
    info[0] = ETHTOOL_GSSET_INFO;
    let mask = 1u64 << ETH_SS_FEATURES;
    info[2] = mask as u32;
    info[3] = (mask >> 32) as u32;
    // SAFETY: the buffer holds the struct and one u32 of data (one bit set).
    if !unsafe { ethtool_ptr(name, info.as_mut_ptr().cast()) } || info[2] == 0 {
        return None;
    }
    let count = info[4] as usize;
    if count == 0 || count > 1024 {
        return None;
    }
    // struct ethtool_gstrings: cmd, string_set, len, then len names.
    let mut strings = vec![0u8; 12 + count * ETH_GSTRING_LEN];
    strings[0..4].copy_from_slice(&ETHTOOL_GSTRINGS.to_ne_bytes());
    strings[4..8].copy_from_slice(&ETH_SS_FEATURES.to_ne_bytes());
    strings[8..12].copy_from_slice(&(count as u32).to_ne_bytes());
    // SAFETY: room for `count` strings after the header.
    if !unsafe { ethtool_ptr(name, strings.as_mut_ptr().cast()) } {
        return None;
    }
    // struct ethtool_gfeatures: cmd, size, then size blocks of
    // (available, requested, active, never_changed).
    let blocks = count.div_ceil(32);
    let mut feats = vec![0u32; 2 + 4 * blocks];
    feats[0] = ETHTOOL_GFEATURES;
    feats[1] = blocks as u32;
    // SAFETY: room for `blocks` blocks after the header.
    if !unsafe { ethtool_ptr(name, feats.as_mut_ptr().cast()) } {
        return None;
    }
    let names: Vec<&[u8]> =
        strings[12..].chunks(ETH_GSTRING_LEN).map(|c| c.split(|b| *b == 0).next().unwrap_or(c)).collect();
    Some(
        wanted
            .iter()
            .map(|w| {
                let bit = names.iter().position(|n| *n == w.as_bytes())?;
                Some(feats[2 + 4 * (bit / 32) + 2] & (1 << (bit % 32)) != 0)
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_answers_and_a_missing_interface_does_not() {
        // lo has no driver info but does answer GGRO (features are generic).
        assert!(gro("lo").is_some());
        assert_eq!(driver("nosuch-if0"), "");
        assert_eq!(gro("nosuch-if0"), None);
        assert_eq!(rx_vlan_offload("nosuch-if0"), None);
        assert_eq!(features("nosuch-if0", &["rx-gro"]), None);
    }

    /// Feature names resolve through the string set: loopback knows GRO
    /// and the VLAN offloads by name, and nothing by a made-up one.
    #[test]
    fn features_by_name_on_loopback() {
        let f = features("lo", &["rx-gro", "tx-vlan-hw-insert", "no-such-feature"]).expect("lo answers");
        assert_eq!(f[0], gro("lo"), "rx-gro is what ETHTOOL_GGRO reads");
        assert!(f[1].is_some(), "{f:?}");
        assert_eq!(f[2], None);
    }
}
