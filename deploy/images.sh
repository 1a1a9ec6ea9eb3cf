#!/usr/bin/env bash
# Builds every image docker-compose.yml uses, locally, without pulling anything.
#
#   deploy/images.sh              binaries built on this host (cargo build --release),
#                                 copied into the Dockerfiles' `prebuilt` target
#   deploy/images.sh --source     the Dockerfiles' default target: Rust build stage inside
#                                 Docker (needs the rust image, i.e. a registry)
#
# Base images: when `debian:bookworm-slim` is missing (no registry here), a minimal
# bookworm is made with debootstrap and imported under that name; a second one that also
# carries HAProxy and etcd (lb-registry/bookworm-tools) lets the ha and etcd images build
# without network access inside `docker build`.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-prebuilt}
PROFILE=${PROFILE:-release}
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
  echo "==> debootstrap bookworm for $image ${include:+(with $include)}" >&2
  $SUDO debootstrap --variant=minbase --cache-dir="$cache" ${include:+--include="$include"} \
    bookworm "$root" http://deb.debian.org/debian >&2
  $SUDO rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
  $SUDO tar -C "$root" -c . | docker import - "$image" >/dev/null
  $SUDO rm -rf "$root"
  echo "==> imported $image" >&2
}

make_base debian:bookworm-slim
make_base lb-registry/bookworm-tools:latest haproxy,etcd-server,etcd-client

if [ "$mode" = "--source" ]; then
  docker build -f deploy/etcd/Dockerfile -t lb-registry/etcd:latest .
  docker build -f deploy/ha/Dockerfile -t lb-registry/ha:latest .
  docker build -f deploy/webapp/Dockerfile -t lb-registry/webapp:latest .
  exit 0
fi

echo "==> building binaries ($PROFILE)" >&2
if [ "$PROFILE" = release ]; then
  cargo build --release --locked -p registrar -p renderer -p webapp
else
  cargo build --locked -p registrar -p renderer -p webapp
fi
rm -rf deploy/.bin && mkdir -p deploy/.bin
cp "target/$PROFILE/registrar" "target/$PROFILE/renderer" "target/$PROFILE/webapp" deploy/.bin/

tools=lb-registry/bookworm-tools:latest
docker build -q -f deploy/etcd/Dockerfile --build-arg BASE_IMAGE=$tools -t lb-registry/etcd:latest . >/dev/null
docker build -q -f deploy/ha/Dockerfile --target prebuilt --build-arg BASE_IMAGE=$tools \
  --build-arg BIN_DIR=deploy/.bin -t lb-registry/ha:latest . >/dev/null
docker build -q -f deploy/webapp/Dockerfile --target prebuilt \
  --build-arg BIN_DIR=deploy/.bin -t lb-registry/webapp:latest . >/dev/null
echo "==> images: lb-registry/etcd lb-registry/ha lb-registry/webapp" >&2
