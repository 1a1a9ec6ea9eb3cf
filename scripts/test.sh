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
cargo test --workspace --locked -- "$@"
