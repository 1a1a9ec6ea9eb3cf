#!/usr/bin/env bash
# Runs every check and test on a fresh Debian/Ubuntu machine: installs what is missing,
# checks formatting and lints, builds the binaries the end-to-end tests spawn, runs all tests.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh

echo "==> cargo fmt --check" >&2
cargo fmt --all -- --check
echo "==> cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo build" >&2
cargo build --workspace --locked
echo "==> cargo test" >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked --lib --bins --tests -- "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# One closing line over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "all tests: %d passed, %d failed\n", p, f }' "$log"
exit "$rc"
