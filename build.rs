//! Compiles the BPF programs with clang and generates their typed skeletons.
use std::{env, path::PathBuf};

use libbpf_cargo::SkeletonBuilder;

/// (source, skeleton file): the product's fast path, and the benchmark's
/// generator and floor programs (kept out of the product object).
const OBJECTS: [(&str, &str); 2] = [("bpf/fastpath.bpf.c", "fastpath.skel.rs"), ("bpf/bench.bpf.c", "bench.skel.rs")];

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR set by cargo"));
    // Debian keeps asm/ headers under the multiarch directory, which clang's
    // BPF target does not search by itself.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = match arch.as_str() {
        "x86_64" => "/usr/include/x86_64-linux-gnu",
        "aarch64" => "/usr/include/aarch64-linux-gnu",
        _ => "/usr/include",
    };
    for (src, skel) in OBJECTS {
        if let Err(e) = SkeletonBuilder::new()
            .source(src)
            .clang_args(["-I", "bpf", "-I", multiarch, "-Wall", "-Werror", "-O2"])
            .build_and_generate(out.join(skel))
        {
            panic!("building {src} failed: {e:#}\n(needs clang and libelf/zlib headers: run ./run.sh setup)");
        }
    }
    for f in ["fastpath.bpf.c", "bench.bpf.c", "flow.h", "maps.h", "parse.h", "nat.h", "csum.h"] {
        println!("cargo:rerun-if-changed=bpf/{f}");
    }
}
