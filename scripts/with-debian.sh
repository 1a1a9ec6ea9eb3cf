#!/usr/bin/env bash
# Runs a command with another Debian release's HAProxy and etcd first on PATH: the
# binaries come from a root debootstrapped from Debian's registry (scripts/debian-root.sh)
# and run chrooted into it, so they use that release's own libraries.
#
#   scripts/with-debian.sh trixie -- cargo test -p e2e --test renderer
#   scripts/with-debian.sh trixie -- haproxy -v
#
# Each wrapper keeps its PID (unshare, sh, chroot and sh all exec), so the test harness
# signals and reaps the real process. It runs in a private mount namespace that sees the
# host's /tmp, /dev and /proc: config files, sockets and data dirs under /tmp are the same
# paths inside and out, and the mounts vanish with the process (nothing to unmount).
set -euo pipefail
cd "$(dirname "$0")/.."

suite=${1:?usage: with-debian.sh SUITE -- COMMAND...}
shift
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "usage: with-debian.sh SUITE -- COMMAND..." >&2; exit 64; }

root=$(scripts/debian-root.sh "$suite" tools haproxy,etcd-server,etcd-client)
wrappers="$root.bin"
mkdir -p "$wrappers"
for tool in /usr/sbin/haproxy /usr/bin/etcd /usr/bin/etcdctl; do
  cat >"$wrappers/$(basename "$tool")" <<EOF
#!/bin/sh
# $suite's $(basename "$tool"), chrooted into $root (made by scripts/with-debian.sh).
exec unshare --mount --propagation private sh -c '
  r=\$1; shift
  for d in tmp dev proc; do mount --rbind "/\$d" "\$r/\$d" || exit 70; done
  exec chroot "\$r" /bin/sh -c "cd \"\\\$0\" 2>/dev/null; exec $tool \"\\\$@\"" "\$PWD" "\$@"
' sh "$root" "\$@"
EOF
  chmod +x "$wrappers/$(basename "$tool")"
done
export PATH="$wrappers:$PATH"
echo "==> $suite: $(haproxy -v | head -1); $(etcd --version | head -1)" >&2
exec "$@"
