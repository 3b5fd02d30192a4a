//! Compiles the benchmark's BPF programs (traffic generator, bare-redirect
//! floor) and generates their typed skeleton.
#[path = "../bpf/build_skel.rs"]
mod build_skel;

fn main() {
    build_skel::build("bpf/bench.bpf.c", "bpf", "bench");
    println!("cargo:rerun-if-changed=../bpf/build_skel.rs");
}
