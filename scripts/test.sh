#!/usr/bin/env bash
# Runs every check and test on a fresh Debian machine: installs what is missing, checks
# formatting and lints, builds the binaries the end-to-end tests spawn, runs all tests
# against this machine's HAProxy and etcd (Debian 12: 2.6 / 3.4), runs the end-to-end
# suites again against Debian 13's (3.0 / 3.5, from a debootstrapped root), and finally
# the pristine-root check: the README's commands on bare Debian 12 and 13 roots.
#
#   scripts/test.sh [TEST FILTER…]   arguments go to every `cargo test` run
#   FIELD_CHECKS=0 scripts/test.sh   skip the Debian 13 run and the pristine roots
#                                    (quick local iteration; CI never sets it)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh

echo "==> cargo fmt --check" >&2
cargo fmt --all -- --check
echo "==> cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo build" >&2
cargo build --workspace --locked

log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Sums the `test result:` lines of the log from line $1 on.
count() {
  tail -n +"$1" "$log" | awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "%d passed, %d failed", p, f }'
}
rc=0
echo "==> cargo test (Debian 12 binaries: $(haproxy -v | head -1 | cut -d' ' -f1-3), etcd $(etcd --version | head -1 | cut -d' ' -f3))" >&2
set +e
cargo test --workspace --locked --no-fail-fast --lib --bins --tests -- "$@" 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
set -e
summary="debian12: $(count 1)"

if [ "${FIELD_CHECKS:-1}" != 0 ]; then
  # Every end-to-end suite but docker.rs (its images carry their own HAProxy and etcd).
  echo "==> end-to-end suites against Debian 13's HAProxy and etcd" >&2
  from=$(($(wc -l <"$log") + 1))
  set +e
  scripts/with-debian.sh trixie -- cargo test -p e2e --locked --no-fail-fast \
    --test registrar --test renderer --test runtime_api --test cluster \
    --test observability --test hardening --test partition --test secure --test lost_events --test controls --test chaos --test examples -- "$@" 2>&1 | tee -a "$log"
  rc13=${PIPESTATUS[0]}
  set -e
  [ "$rc" -ne 0 ] || rc=$rc13
  summary="$summary; debian13: $(count "$from")"

  echo "==> pristine roots: the README's commands on bare Debian 12 and 13" >&2
  if scripts/pristine-check.sh bookworm trixie; then
    summary="$summary; pristine roots: 2 passed, 0 failed"
  else
    rc=1
    summary="$summary; pristine roots: FAILED"
  fi
else
  echo "==> FIELD_CHECKS=0: Debian 13 suites and pristine roots skipped" >&2
fi
echo "$summary" >&2
# One closing line over every test binary of every run.
echo "total: $(count 1)"
exit "$rc"
