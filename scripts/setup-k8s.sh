#!/usr/bin/env bash
# Builds a real Kubernetes from Debian bookworm's `kubernetes` source package, offline, with
# Debian's golang-go: kube-apiserver + kube-controller-manager (the controller's integration
# tests) and kubelet + kube-scheduler + kube-proxy (the real nodes of the `k8s` suite). Installs
# etcd-server, containerd, runc, the CNI plugins, yamllint and kubernetes-validate.
# Idempotent: the binaries are cached outside the repo, keyed by the source version, in
#   ${MESH_K8S_CACHE:-/var/cache/mesh}/k8s-<version>/bin/
# and only missing ones are built. Facts behind each step: ../shared/notes/k8s-and-tools.md. The
# Go build takes ~11 min on 2 cores for the first two and ~5 more for the node binaries; it runs
# under `nice -n 19` so it does not stall other work. Run as root.
set -euo pipefail

say() { printf '\033[1msetup-k8s:\033[0m %s\n' "$*"; }
die() { printf '\033[31msetup-k8s: error:\033[0m %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (installs packages); try: sudo $0"
command -v apt-get >/dev/null || die "apt-get not found: this setup supports Debian 12 (bookworm) only"

CACHE=${MESH_K8S_CACHE:-/var/cache/mesh}
mkdir -p "$CACHE"
# One run at a time (a background run of `cargo xtask test` may outlive a failed test run).
exec 9>"$CACHE/setup-k8s.lock"
flock 9
# containerd/runc/CNI plugins: the container runtime of the test nodes; iptables + conntrack:
# kube-proxy (iptables mode) inside each node's network namespace.
PACKAGES=(golang-go etcd-server golang-github-modern-go-reflect2-dev rsync make dpkg-dev yamllint openssl python3-venv
  containerd runc containernetworking-plugins iptables conntrack)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  # Wait for another apt run (setup.sh, a colleague) instead of failing on the dpkg lock.
  apt-get -o DPkg::Lock::Timeout=600 update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" \
    >/tmp/mesh-setup-k8s-apt.log 2>&1 || die "apt-get install failed (log: /tmp/mesh-setup-k8s-apt.log)"
fi
command -v kubectl >/dev/null || die "kubectl not found (expected preinstalled, see notes)"

# kubernetes-validate (PyPI) in its own venv, so the system Python stays untouched.
VENV=$CACHE/venv
if [ ! -x "$VENV/bin/kubernetes-validate" ]; then
  say "installing kubernetes-validate into $VENV"
  mkdir -p "$CACHE"
  /usr/bin/python3 -m venv "$VENV" || die "python3 -m venv failed"
  "$VENV/bin/pip" install -q 'kubernetes-validate==1.37.0' >/tmp/mesh-setup-k8s-pip.log 2>&1 \
    || die "pip install kubernetes-validate failed (log: /tmp/mesh-setup-k8s-pip.log)"
fi

# Source package, from a private apt configuration (deb-src lines) so /etc/apt stays untouched.
APT=$CACHE/apt
mkdir -p "$APT/lists/partial"
cat >"$APT/sources.list" <<'EOF'
deb-src http://deb.debian.org/debian bookworm main
deb-src http://deb.debian.org/debian bookworm-updates main
deb-src http://deb.debian.org/debian-security bookworm-security main
EOF
apt_src() {
  local tool=$1; shift
  "$tool" -o Dir::Etc::SourceList="$APT/sources.list" -o Dir::Etc::SourceParts=/dev/null \
    -o Dir::State::Lists="$APT/lists" "$@"
}
if [ ! -s "$APT/version" ]; then
  say "reading the kubernetes source package index"
  apt_src apt-get update -qq >/tmp/mesh-setup-k8s-apt-src.log 2>&1 || die "apt-get update (deb-src) failed (log: /tmp/mesh-setup-k8s-apt-src.log)"
  apt_src apt-cache showsrc kubernetes | awk '/^Version:/ { print $2 }' | sort -V | tail -1 >"$APT/version"
fi
VERSION=$(cat "$APT/version")
[ -n "$VERSION" ] || { rm -f "$APT/version"; die "no kubernetes source package found"; }
DIR=$CACHE/k8s-$VERSION
BIN=$DIR/bin
BINARIES=(kube-apiserver kube-controller-manager kubelet kube-scheduler kube-proxy)
want=()
for b in "${BINARIES[@]}"; do
  [ -x "$BIN/$b" ] || want+=("$b")
done
if [ ${#want[@]} -eq 0 ]; then
  say "Kubernetes $VERSION present in $BIN (${BINARIES[*]})"
  exit 0
fi

SRC=$DIR/src
if [ ! -d "$SRC/vendor" ]; then
  say "downloading the kubernetes $VERSION source package"
  rm -rf "$DIR/dl" "$SRC"
  mkdir -p "$DIR/dl"
  (cd "$DIR/dl" && apt_src apt-get source --download-only -qq "kubernetes=$VERSION") \
    >/tmp/mesh-setup-k8s-src.log 2>&1 || die "apt-get source failed (log: /tmp/mesh-setup-k8s-src.log)"
  dpkg-source -x "$DIR"/dl/kubernetes_*.dsc "$SRC" >>/tmp/mesh-setup-k8s-src.log 2>&1 \
    || die "dpkg-source -x failed (log: /tmp/mesh-setup-k8s-src.log)"
fi

# The vendored reflect2 1.0.1 crashes under Go >= 1.18 ("fatal error: fault" in mapiterinit) the
# first time a custom resource is written: use Debian's 1.0.2 instead.
R2_SRC=/usr/share/gocode/src/github.com/modern-go/reflect2
R2_DST=$SRC/vendor/github.com/modern-go/reflect2
[ -d "$R2_SRC" ] || die "$R2_SRC missing (package golang-github-modern-go-reflect2-dev)"
rsync -a --delete --exclude '*_test.go' "$R2_SRC/" "$R2_DST/"

what=$(printf 'cmd/%s ' "${want[@]}")
say "building ${want[*]} $VERSION (nice 19, ~5 min per binary on 2 cores; log: $DIR/build.log)"
started=$(date +%s)
# Go's build cache (several GB for these binaries) goes in a folder of our own, removed below:
# nothing reuses it once the binaries are cached.
(cd "$SRC" && GOFLAGS=-mod=vendor GO111MODULE=on GOTOOLCHAIN=local GOPROXY=off GOCACHE="$DIR/gocache" \
  nice -n 19 make WHAT="${what% }" KUBE_BUILD_PLATFORMS=linux/amd64) \
  >"$DIR/build.log" 2>&1 || die "build failed (log: $DIR/build.log)"
mkdir -p "$BIN"
for b in "${want[@]}"; do
  cp "$SRC/_output/bin/$b" "$BIN/$b.tmp" && mv "$BIN/$b.tmp" "$BIN/$b"
done
say "built in $(( $(date +%s) - started )) s: $BIN"
# The source tree is 1+ GB after the build; the binaries are all we need.
rm -rf "$SRC/_output" "$DIR/dl" "$DIR/gocache"
