//! The guest's first userspace: a busybox initramfs, built per kernel
//! release because the modules it loads before the host's root is reachable
//! (virtio, 9p, overlay) are that release's own.
//!
//! Written as a cpio "newc" archive (the format the kernel unpacks,
//! init/initramfs.c) directly: a few dozen lines, no `cpio` tool needed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};

/// Modules the initramfs loads, in the order given; each one's own
/// dependencies (modules.dep) are loaded before it. Built into some
/// kernels (6.12 has virtio_pci built in): those are simply absent from
/// modules.dep and skipped.
const EARLY_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];

/// One file of the archive.
enum Entry {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    CharDev { major: u32, minor: u32 },
}

/// A newc archive being built, by path (sorted: parents before children).
#[derive(Default)]
pub struct Cpio {
    entries: BTreeMap<String, Entry>,
}

impl Cpio {
    pub fn dir(&mut self, path: &str) {
        self.entries.insert(path.to_string(), Entry::Dir);
    }

    pub fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        self.entries.insert(path.to_string(), Entry::File { data, mode });
    }

    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) {
        self.entries.insert(path.to_string(), Entry::CharDev { major, minor });
    }

    /// The archive's bytes: each entry a 110-byte ASCII header, its name
    /// (NUL-terminated) and its data, each padded to 4 bytes, then the
    /// `TRAILER!!!` entry.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (ino, (name, e)) in self.entries.iter().enumerate() {
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match e {
                Entry::Dir => (0o040755, &[], (0, 0)),
                Entry::File { data, mode } => (0o100000 | mode, data, (0, 0)),
                Entry::CharDev { major, minor } => (0o020600, &[], (*major, *minor)),
            };
            let nlink = if matches!(e, Entry::Dir) { 2 } else { 1 };
            push_entry(&mut out, ino as u32 + 1, mode, nlink, name, data, rdev);
        }
        push_entry(&mut out, 0, 0, 1, "TRAILER!!!", &[], (0, 0));
        out
    }
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn push_entry(out: &mut Vec<u8>, ino: u32, mode: u32, nlink: u32, name: &str, data: &[u8], rdev: (u32, u32)) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        data.len() as u32,
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0, // check (only for the "070702" format)
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

/// `modules.dep` of a release: module name -> (path, dependencies' paths).
fn modules_dep(modules_dir: &Path) -> Result<BTreeMap<String, (String, Vec<String>)>> {
    let p = modules_dir.join("modules.dep");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let mut map = BTreeMap::new();
    for line in text.lines() {
        let Some((path, deps)) = line.split_once(':') else { continue };
        map.insert(module_name(path), (path.to_string(), deps.split_whitespace().map(str::to_string).collect()));
    }
    Ok(map)
}

/// `kernel/fs/9p/9p.ko.xz` -> `9p`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).to_string()
}

/// The module files to load, dependencies first, each once.
pub fn module_order(dep: &BTreeMap<String, (String, Vec<String>)>, wanted: &[&str]) -> Vec<String> {
    fn visit(dep: &BTreeMap<String, (String, Vec<String>)>, path: &str, out: &mut Vec<String>) {
        if out.iter().any(|p| p == path) {
            return;
        }
        if let Some((_, deps)) = dep.get(&module_name(path)) {
            for d in deps {
                visit(dep, d, out);
            }
        }
        out.push(path.to_string());
    }
    let mut out = Vec::new();
    for w in wanted {
        if let Some((path, _)) = dep.get(*w) {
            visit(dep, path, &mut out);
        }
    }
    out
}

/// A module file's bytes, decompressed (busybox's insmod takes plain ELF).
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => std::fs::read(path).with_context(|| format!("reading {}", path.display())),
        Some(t) => {
            let out = Command::new(t)
                .args(["-dc"])
                .arg(path)
                .output()
                .with_context(|| format!("running {t} -dc {} (is {t} installed?)", path.display()))?;
            if !out.status.success() {
                bail!("{t} -dc {} failed: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
            }
            Ok(out.stdout)
        }
    }
}

/// What the guest's init runs once the host's root is its own: a shell
/// command line (executed by the host's /bin/sh, after `switch_root`).
pub struct GuestJob {
    pub command: String,
}

/// Build the initramfs for the kernel whose modules are in `modules_dir`
/// into `out`.
pub fn build(modules_dir: &Path, job: &GuestJob, out: &Path) -> Result<PathBuf> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("busybox not found (install busybox-static)"))?;
    let bb = std::fs::read(&busybox).with_context(|| format!("reading {}", busybox.display()))?;
    if bb.get(..4) != Some(b"\x7fELF") {
        bail!("{} is not an ELF binary", busybox.display());
    }
    let mut cpio = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "mods", "lower", "upper", "newroot"] {
        cpio.dir(d);
    }
    cpio.char_dev("dev/console", 5, 1);
    cpio.file("bin/busybox", bb, 0o755);

    let dep = modules_dep(modules_dir)?;
    let order = module_order(&dep, EARLY_MODULES);
    if !order.iter().any(|p| module_name(p) == "9p") {
        bail!("{}: no 9p module in modules.dep (the guest cannot reach the host's root)", modules_dir.display());
    }
    let mut names = Vec::new();
    for (i, p) in order.iter().enumerate() {
        let name = format!("mods/{i:02}-{}.ko", module_name(p));
        cpio.file(&name, module_bytes(&modules_dir.join(p))?, 0o644);
        names.push(name);
    }
    cpio.file("init", init_script(&names, job).into_bytes(), 0o755);
    std::fs::write(out, cpio.encode()).with_context(|| format!("writing {}", out.display()))?;
    Ok(out.to_path_buf())
}

/// PID 1 of the initramfs. Any failure powers the guest off at once (the
/// host sees the console and no results) rather than leaving a shell that
/// nobody answers until the timeout.
fn init_script(modules: &[String], job: &GuestJob) -> String {
    let insmods: String = modules.iter().map(|m| format!("insmod /{m} || fail \"insmod {m}\"\n")).collect();
    // 9p over virtio: the host's root, read-only, as the lower layer of an
    // overlay whose upper layer is a tmpfs: the guest may write anywhere
    // (/etc, /run, /var) without touching the host. proc, sysfs and devtmpfs
    // are mounted on the new root before switch_root: moved mounts made the
    // guest see the host's /proc through 9p (reference/vm-kernels.md).
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
fail() {{ echo "nfo-vm: $1 failed" >/dev/console; echo o > /proc/sysrq-trigger; sleep 10; }}
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
{insmods}mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot /lower || fail "mounting the host's root"
mount -t tmpfs -o size=1g,mode=0755 tmpfs /upper || fail "tmpfs"
mkdir -p /upper/u /upper/w
mount -t overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w overlay /newroot || fail "overlay"
mkdir -p /newroot/nfo-results
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results /newroot/nfo-results || fail "mounting the results"
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
exec switch_root /newroot /bin/sh -c '{}'
"#,
        guest_shell(job).replace('\'', r"'\''")
    )
}

/// What runs as PID 1 in the new root: the rest of a normal system's early
/// mounts, the job, and the power-off that ends the VM.
fn guest_shell(job: &GuestJob) -> String {
    format!(
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8; \
         mount -t tmpfs -o mode=0755 tmpfs /run; mkdir -p /run/netns /run/lock; \
         mount -t tmpfs -o mode=1777 tmpfs /tmp; \
         mkdir -p /dev/pts; mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts; \
         mount -t bpf bpf /sys/fs/bpf; mount -t cgroup2 none /sys/fs/cgroup; \
         mount -t debugfs none /sys/kernel/debug 2>/dev/null; \
         ip link set lo up; \
         {} ; echo \"nfo-vm: job exited $?\"; echo o > /proc/sysrq-trigger; sleep 30",
        job.command
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_entries_are_aligned_and_end_with_the_trailer() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("bin/x", b"hello".to_vec(), 0o755);
        c.char_dev("dev/console", 5, 1);
        let b = c.encode();
        assert_eq!(&b[..6], b"070701");
        assert_eq!(b.len() % 4, 0);
        let s = String::from_utf8_lossy(&b);
        assert!(s.contains("bin/x\0") && s.contains("hello") && s.contains("TRAILER!!!\0"));
        // The file's header: mode 100755, size 5, name length 6.
        let at = s.find("bin/x\0").unwrap() - 110;
        let hdr = &s[at..at + 110];
        assert_eq!(&hdr[14..22], "000081ed");
        assert_eq!(&hdr[54..62], "00000005");
        assert_eq!(&hdr[94..102], "00000006");
        // The console is a character device 5:1.
        let at = s.find("dev/console\0").unwrap() - 110;
        let hdr = &s[at..at + 110];
        assert_eq!(&hdr[14..22], "00002180");
        assert_eq!(&hdr[78..86], "00000005");
        assert_eq!(&hdr[86..94], "00000001");
    }

    #[test]
    fn modules_come_after_their_dependencies_and_once() {
        let text = "kernel/fs/netfs/netfs.ko.xz:\n\
                    kernel/fs/fscache/fscache.ko.xz: kernel/fs/netfs/netfs.ko.xz\n\
                    kernel/net/9p/9pnet.ko.xz: kernel/fs/netfs/netfs.ko.xz\n\
                    kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/fscache/fscache.ko.xz kernel/fs/netfs/netfs.ko.xz\n\
                    kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz\n\
                    kernel/fs/overlayfs/overlay.ko.xz:\n";
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("modules.dep"), text).unwrap();
        let dep = modules_dep(dir.path()).unwrap();
        let order: Vec<String> = module_order(&dep, EARLY_MODULES).iter().map(|p| module_name(p)).collect();
        // virtio_pci is built in here: not listed, so skipped.
        assert_eq!(order, ["netfs", "9pnet", "9pnet_virtio", "fscache", "9p", "overlay"]);
    }

    #[test]
    fn the_job_survives_shell_quoting() {
        let s = init_script(&[], &GuestJob { command: "echo 'a b' \"c\"".into() });
        assert!(s.contains(r"echo '\''a b'\'' "), "{s}");
    }
}
