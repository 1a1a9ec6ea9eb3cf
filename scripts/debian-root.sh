#!/usr/bin/env bash
# Makes (once) and prints the path of a Debian root built with debootstrap from Debian's
# registry alone: no image registry, nothing prebuilt.
#
#   scripts/debian-root.sh SUITE NAME [PACKAGES]   e.g.  trixie tools haproxy,etcd-server
#
# The root is kept as a tarball under $ROOTS_CACHE (default /var/cache/lb-registry/roots),
# keyed by suite, name and package list, and unpacked into a fresh directory on every call
# when FRESH=1 (the pristine-root check wants an untouched root each time) or into a
# persistent one otherwise (the Debian 13 test matrix only runs binaries from it).
# Prints the root's path on stdout; progress goes to stderr.
set -euo pipefail

suite=${1:?usage: debian-root.sh SUITE NAME [PACKAGES]}
name=${2:?usage: debian-root.sh SUITE NAME [PACKAGES]}
include=${3:-}
cache=${ROOTS_CACHE:-/var/cache/lb-registry/roots}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

$SUDO mkdir -p "$cache"
tag="$suite-$name-$(printf '%s' "$include" | md5sum | cut -c1-8)"
tarball="$cache/$tag.tar"
if [ ! -s "$tarball" ]; then
  if ! command -v debootstrap >/dev/null; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends debootstrap >&2
  fi
  build=$(mktemp -d "$cache/.build-XXXX")
  $SUDO mkdir -p "$cache/.debs"
  echo "==> debootstrap $suite ($name${include:+: $include}) — once, then cached in $tarball" >&2
  # Keyrings: bookworm's debian-archive-keyring already carries trixie's keys.
  $SUDO debootstrap --variant=minbase --cache-dir="$cache/.debs" \
    ${include:+--include="$include"} "$suite" "$build" "$mirror" >&2
  $SUDO rm -rf "$build"/var/lib/apt/lists/* "$build"/var/cache/apt/archives/*.deb
  $SUDO tar --numeric-owner -C "$build" -cf "$tarball.tmp" .
  $SUDO mv "$tarball.tmp" "$tarball"
  $SUDO rm -rf "$build"
fi

if [ "${FRESH:-0}" = 1 ]; then
  root=$(mktemp -d "${TMPDIR:-/tmp}/lb-root-$tag-XXXX")
else
  root="$cache/$tag"
  [ -e "$root/.complete" ] && { echo "$root"; exit 0; }
  $SUDO rm -rf "$root"
  $SUDO mkdir -p "$root"
fi
# Numeric owners: the root has its own users (etcd, haproxy, messagebus) whose ids
# differ from the host's users of the same names.
$SUDO tar --numeric-owner -C "$root" -xf "$tarball"
# The tarball's "." is the 0700 build directory mktemp made: the root's own users (etcd,
# haproxy) must reach / when it is booted.
$SUDO chmod 0755 "$root"
[ "${FRESH:-0}" = 1 ] || $SUDO touch "$root/.complete"
echo "$root"
