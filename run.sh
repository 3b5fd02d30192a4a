#!/usr/bin/env bash
# nft-offload: one entry point for set-up, the demo and the tests.
#   ./run.sh demo   install what is missing, build, run the lab demo
#   ./run.sh test   install what is missing, build, run every test (with
#                   the VM tier on Debian's 6.1 and 6.12 kernels)
#   ./run.sh bench  install what is missing, build, run the benchmark
#                   (plots in bench-plots/; add --json FILE for every figure, --quick for ~2 min)
#   ./run.sh deb    install what is missing (cargo-deb too), build the Debian
#                   package (target/debian/nft-offload_*.deb)
#   ./run.sh setup  only install the system packages
# Every build is of the whole workspace: the router binary (nft-offload) and
# the lab's (nft-offload-lab), which finds the router binary next to itself.
set -euo pipefail
cd "$(dirname "$0")"

# iptables: its iptables-legacy for the test that legacy x_tables changes
# reach offloaded connections (lab/tests/back_through_ruleset.rs).
PKGS=(clang llvm make libelf-dev zlib1g-dev pkg-config nftables iproute2 conntrack iperf3 ethtool curl iputils-ping util-linux procps python3 iptables)
# The VM tier (lab/tests/vm.rs): qemu, Debian 12's 6.1 and the 6.12 kernel,
# busybox for the guest's initramfs, and the tools its scenarios run.
VM_PKGS=(qemu-system-x86 busybox-static xz-utils zstd linux-image-amd64 linux-image-6.12-amd64 ppp pppoe wireguard-tools tcpdump)

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "run.sh: needs root (BPF, network namespaces, apt-get); try: sudo $0 $*" >&2
        exit 1
    fi
}

setup() {
    local missing=()
    for p in "${PKGS[@]}" ${WITH_VM:+"${VM_PKGS[@]}"}; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "run.sh: installing ${missing[*]}" >&2
        apt-get update -qq
        # INITRD=No: the kernel packages are booted by the VM tier with its
        # own initramfs; skip building Debian's (/etc/kernel/postinst.d).
        DEBIAN_FRONTEND=noninteractive INITRD=No apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    command -v cargo >/dev/null || { echo "run.sh: cargo not found (install Rust stable)" >&2; exit 1; }
}

# The Debian package: release binary, the man pages and completions the lab
# generates from the CLI definition, then cargo-deb around them.
# Only the router binary is built, in its own profile (Cargo.toml: abort on
# panic, size-optimised); the generator runs from the lab's debug build.
build_deb() {
    command -v cargo-deb >/dev/null || cargo install --locked --quiet cargo-deb
    cargo build --profile router --locked -q -p nft-offload
    rm -rf target/assets target/debian
    cargo run --locked -q -p nft-offload-lab -- docs --out target/assets >/dev/null
    cargo deb --no-build --profile router --locked -p nft-offload -o target/debian/ 2>&1 | tail -1
}

cmd="${1:-}"
shift || true
case "$cmd" in
    setup) need_root "$cmd"; setup ;;
    demo)
        need_root "$cmd"; setup
        cargo build --workspace --release --locked -q
        exec ./target/release/nft-offload-lab demo "$@"
        ;;
    deb)
        need_root "$cmd"; setup
        build_deb
        ;;
    bench)
        need_root "$cmd"; setup
        cargo build --workspace --release --locked -q
        exec ./target/release/nft-offload-lab bench "$@"
        ;;
    test)
        need_root "$cmd"; WITH_VM=1 setup
        # The lab's tests run the router binary built here (target/debug).
        cargo build --workspace --locked -q
        # The router crate's unit and packaging tests first (fast), then
        # every test of the lab crate (its unit tests, the fast-path tables
        # and each end-to-end file in lab/tests/) one at a time: they move
        # real traffic and measure nothing, but two iperf3 runs at once on 2
        # CPUs only make each other slower. lab/tests/vm.rs is the VM tier:
        # Debian's 6.1 and 6.12 kernels under qemu, one boot each, every
        # scenario reported as a test of its own (~25 minutes).
        cargo test --locked -p nft-offload --lib --bins --test packaging
        # The Debian package, which lab/tests/debian_package.rs installs,
        # runs against the lab and purges.
        build_deb
        cargo test --locked -p nft-offload-lab --tests -- --test-threads=1
        # The benchmark, quick, once: proves it still runs (no timing asserted).
        ./target/debug/nft-offload-lab bench --quick --json target/bench-quick.json --plots target/bench-quick-plots
        cargo fmt --all --check
        cargo clippy --workspace --all-targets --locked -q -- -D warnings
        ;;
    *)
        echo "usage: $0 demo|test|bench|deb|setup" >&2
        exit 2
        ;;
esac
