#!/usr/bin/env bash
# Builds every image docker-compose.yml uses, locally, without pulling anything.
#
#   deploy/images.sh              binaries built on this host (cargo build --release),
#                                 copied into the Dockerfiles' `prebuilt` target
#   deploy/images.sh --source     the Dockerfiles' default target: Rust build stage inside
#                                 Docker (needs the rust image, i.e. a registry)
#   DEBIAN_SUITE=trixie deploy/images.sh   the same on Debian 13 (HAProxy 3.0, etcd 3.5);
#                                 default bookworm (Debian 12: HAProxy 2.6, etcd 3.4)
#
# Base images: when `debian:<suite>-slim` is missing (no registry here), a minimal root
# of the suite is made with debootstrap and imported under that name; a second one that
# also carries HAProxy and etcd (lb-registry/<suite>-tools) lets the ha and etcd images
# build without network access inside `docker build`. The host binaries are linked against
# the host's glibc: build the trixie images on a host no newer than trixie (Debian 12 or 13).
#
# deploy/.env: created with a random COOKIE_KEY when missing (docker-compose reads it), so
# sticky-session cookies never derive from a public key; both compose files use it.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-prebuilt}
PROFILE=${PROFILE:-release}
SUITE=${DEBIAN_SUITE:-bookworm}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

make_base() { # image-name [extra packages]
  local image=$1 include=${2:-}
  docker image inspect "$image" >/dev/null 2>&1 && return 0
  command -v debootstrap >/dev/null || { $SUDO apt-get update -qq; DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq debootstrap >&2; }
  local root cache
  root=$(mktemp -d /tmp/lb-rootfs-XXXX)
  cache=${DEBOOTSTRAP_CACHE:-/var/cache/lb-registry-debootstrap}
  $SUDO mkdir -p "$cache"
  echo "==> debootstrap $SUITE for $image ${include:+(with $include)}" >&2
  $SUDO debootstrap --variant=minbase --cache-dir="$cache" ${include:+--include="$include"} \
    "$SUITE" "$root" http://deb.debian.org/debian >&2
  $SUDO rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
  $SUDO tar -C "$root" -c . | docker import - "$image" >/dev/null
  $SUDO rm -rf "$root"
  echo "==> imported $image" >&2
}

if ! grep -qs '^COOKIE_KEY=.' deploy/.env; then
  (umask 077 && touch deploy/.env) # private, and only this file: the binaries below must stay 0755
  sed -i '/^COOKIE_KEY=/d' deploy/.env
  printf '# Added by deploy/images.sh: sticky-session cookie secret (HAProxy < 3.0), the same\n# on every load balancer; keep it private.\nCOOKIE_KEY=%s\n' \
    "$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')" >>deploy/.env
  echo "==> wrote a random COOKIE_KEY into deploy/.env" >&2
fi

base=debian:$SUITE-slim
tools=lb-registry/$SUITE-tools:latest
make_base "$base"
make_base "$tools" haproxy,etcd-server,etcd-client

if [ "$mode" = "--source" ]; then
  docker build -f deploy/etcd/Dockerfile --build-arg BASE_IMAGE="$base" -t lb-registry/etcd:latest .
  docker build -f deploy/ha/Dockerfile --build-arg BASE_IMAGE="$base" -t lb-registry/ha:latest .
  docker build -f deploy/webapp/Dockerfile --build-arg BASE_IMAGE="$base" -t lb-registry/webapp:latest .
  exit 0
fi

echo "==> building binaries ($PROFILE)" >&2
registrar_dir=target/$PROFILE
if [ "$PROFILE" = release ]; then
  cargo build --release --locked -p renderer -p webapp
  # The registrar is built for size (Cargo.toml, profile release-small).
  cargo build --profile release-small --locked -p registrar
  registrar_dir=target/release-small
else
  cargo build --locked -p registrar -p renderer -p webapp
fi
rm -rf deploy/.bin && mkdir -p deploy/.bin
install -m 0755 "$registrar_dir/lb-registrar" "target/$PROFILE/lb-renderer" "target/$PROFILE/webapp" deploy/.bin/

docker build -q -f deploy/etcd/Dockerfile --build-arg BASE_IMAGE=$tools -t lb-registry/etcd:latest . >/dev/null
docker build -q -f deploy/ha/Dockerfile --target prebuilt --build-arg BASE_IMAGE=$tools \
  --build-arg BIN_DIR=deploy/.bin -t lb-registry/ha:latest . >/dev/null
docker build -q -f deploy/webapp/Dockerfile --target prebuilt --build-arg BASE_IMAGE="$base" \
  --build-arg BIN_DIR=deploy/.bin -t lb-registry/webapp:latest . >/dev/null
echo "==> images ($SUITE): lb-registry/etcd lb-registry/ha lb-registry/webapp" >&2
