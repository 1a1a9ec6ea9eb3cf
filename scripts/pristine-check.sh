#!/usr/bin/env bash
# The README's two commands, as a new user meets them: on a machine that has nothing but
# Debian and a Rust toolchain. For each suite (default: bookworm trixie, i.e. Debian 12
# and 13), in a fresh root debootstrapped from Debian's registry with only what rustup
# itself needs (a C compiler and linker, CA certificates):
#
#   1. this tree copied in, the host's Rust toolchain mounted read-only, an empty
#      CARGO_HOME; `scripts/deps.sh` and `cargo build --workspace --locked`;
#   2. in network and PID namespaces of its own, a "system etcd" on 127.0.0.1:2379 (what the
#      etcd-server package starts under systemd), then `scripts/demo.sh`: it must serve a
#      web app through HAProxy on 127.0.0.1:8080 and log no WARN line, and stop cleanly.
#
# Any failing step fails the check. Usage: scripts/pristine-check.sh [SUITE...]
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" -eq 0 ] || { echo "pristine-check: needs root (debootstrap, chroot, mounts)" >&2; exit 1; }
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(bookworm trixie)
toolchain=$(rustc --print sysroot)
ca_bundle=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}

root=""
cleanup() {
  # Every mount lived in a private mount namespace that ended with its process: nothing
  # is mounted under the root any more. --one-file-system guards against a surprise.
  [ -n "$root" ] && rm -rf --one-file-system "$root"
  root=""
}
trap cleanup EXIT

# in_root ROOT COMMAND [UNSHARE FLAGS…]: runs COMMAND (bash) chrooted into ROOT with a clean
# environment, in a private mount namespace (so every mount ends with it) holding /dev,
# /proc and the host's toolchain read-only on /opt/rust.
in_root() {
  local r=$1 command=$2 own_net=0
  shift 2
  case " $* " in *" --net "*) own_net=1 ;; esac
  unshare --mount --propagation private "$@" bash -c '
    set -e
    r=$1 tc=$2 command=$3 own_net=$4; shift 4
    [ "$own_net" = 0 ] || ip link set lo up
    mount --rbind /dev "$r/dev"
    mount -t proc proc "$r/proc"
    mount --bind "$tc" "$r/opt/rust"
    mount -o remount,bind,ro "$r/opt/rust"
    exec chroot "$r" "$@" bash -c "$command"
  ' sh "$r" "$toolchain" "$command" "$own_net" "${env_in[@]}"
}

for suite in "${suites[@]}"; do
  started=$(date +%s)
  root=$(FRESH=1 scripts/debian-root.sh "$suite" pristine gcc,libc6-dev,ca-certificates)
  echo "==> [$suite] pristine root $root" >&2
  mkdir -p "$root/src" "$root/opt/rust" "$root/root"
  # The tree as git sees it (tracked and new files, nothing ignored: no target/).
  git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
    tar --null -T - -c | tar -x -C "$root/src"
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  # This machine's network re-signs https with its own CA (see shared/FACTS.md): give the
  # root that bundle beside its own, as a user's machine has the right one already.
  cp "$ca_bundle" "$root/etc/ssl/certs/host-network-ca.crt"

  env_in=(env -i HOME=/root TERM=dumb PATH=/opt/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    CARGO_HOME=/root/.cargo SSL_CERT_FILE=/etc/ssl/certs/host-network-ca.crt
    CARGO_HTTP_CAINFO=/etc/ssl/certs/host-network-ca.crt CARGO_TERM_COLOR=never)

  echo "==> [$suite] scripts/deps.sh + cargo build --workspace --locked" >&2
  in_root "$root" "cd /src && . scripts/deps.sh && cargo --version && cargo build --workspace --locked"

  echo "==> [$suite] scripts/demo.sh beside a system etcd on 2379, in its own network namespace" >&2
  in_root "$root" "cd /src && exec bash scripts/pristine-demo.sh" --net --pid --fork

  cleanup
  echo "==> [$suite] pristine check passed in $(( $(date +%s) - started )) s" >&2
done
