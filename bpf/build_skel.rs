//! Shared by the build scripts of both crates (the router's fast path and
//! the lab's benchmark programs): compile one BPF C file with clang and
//! write its typed skeleton into OUT_DIR.
use std::{env, path::PathBuf};

use libbpf_cargo::SkeletonBuilder;

/// Compile `src` (with `include` on the header path) into
/// `$OUT_DIR/{stem}.bpf.o` and its skeleton `$OUT_DIR/{stem}.skel.rs`;
/// returns the object's path. Panics with a set-up hint on failure.
pub fn build(src: &str, include: &str, stem: &str) -> PathBuf {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR set by cargo"));
    // Debian keeps asm/ headers under the multiarch directory, which clang's
    // BPF target does not search by itself.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = match arch.as_str() {
        "x86_64" => "/usr/include/x86_64-linux-gnu",
        "aarch64" => "/usr/include/aarch64-linux-gnu",
        _ => "/usr/include",
    };
    let obj = out.join(format!("{stem}.bpf.o"));
    let mut args: Vec<String> = ["-I", include, "-I", multiarch, "-Wall", "-Werror", "-O2"].map(String::from).to_vec();
    // The object's byte order is the router's, not the build host's: a
    // big-endian MIPS router (ath79) loads only a bpfeb object (libbpf
    // refuses the other). clang takes the last -target given.
    if env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() == Ok("big") {
        args.extend(["-target", "bpfeb"].map(String::from));
    }
    // Cross builds (OpenWrt's SDK): CLANG names the BPF-capable clang
    // (bpf.mk's), BPF_CFLAGS_EXTRA adds include directories.
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-env-changed=BPF_CFLAGS_EXTRA");
    if let Ok(extra) = env::var("BPF_CFLAGS_EXTRA") {
        args.extend(extra.split_whitespace().map(String::from));
    }
    let mut builder = SkeletonBuilder::new();
    if let Some(clang) = env::var_os("CLANG") {
        builder.clang(clang);
    }
    if let Err(e) =
        builder.source(src).obj(&obj).clang_args(args).build_and_generate(out.join(format!("{stem}.skel.rs")))
    {
        panic!("building {src} failed: {e:#}\n(needs clang and libelf/zlib headers: run ./run.sh setup)");
    }
    println!("cargo:rerun-if-changed={src}");
    obj
}
