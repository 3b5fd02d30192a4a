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
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IF_NAMESIZE],
        data: *mut libc::c_void,
        _pad: [u8; 16],
    }
    let mut req = IfReq { name: [0; libc::IF_NAMESIZE], data: (data as *mut T).cast(), _pad: [0; 16] };
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
    }
}
