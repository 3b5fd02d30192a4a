//! Compiles the fast path's BPF program and generates its typed skeleton
//! (the benchmark's programs are built by the lab crate, not here).
#[path = "bpf/build_skel.rs"]
mod build_skel;

fn main() {
    build_skel::build("bpf/fastpath.bpf.c", "bpf", "fastpath.skel.rs");
    for f in ["flow.h", "maps.h", "parse.h", "nat.h", "csum.h", "build_skel.rs"] {
        println!("cargo:rerun-if-changed=bpf/{f}");
    }
}
