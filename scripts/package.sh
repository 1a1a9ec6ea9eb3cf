#!/usr/bin/env bash
# Builds the Debian packages an operator installs on a load balancer or an app host:
#
#   target/debian/lb-renderer_<version>_<arch>.deb    /usr/bin/lb-renderer, lb-renderer.service,
#       /etc/default/lb-renderer, /etc/lb-registry/haproxy.cfg.hbs (the shipped template),
#       /usr/share/doc/lb-renderer/examples/*.hbs (templates/examples)
#   target/debian/lb-registrar_<version>_<arch>.deb   /usr/bin/lb-registrar, lb-registrar@.service,
#       lb-registrar-docker.service, /etc/default/lb-registrar-docker, /etc/lb-registrar/
#
# each with its man page, bash and zsh completions, copyright (Apache-2.0) and changelog.
# Release build; dpkg-deb, no debhelper. Checks both with lintian (errors fail the build).
#   scripts/package.sh            build and lintian
#   NO_LINTIAN=1 scripts/package.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh

version=$(cargo metadata --no-deps --format-version 1 |
  python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="renderer"))')
arch=$(dpkg --print-architecture)
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
out=target/debian
echo "==> cargo build --release (lb-renderer, lb-registrar $version, $commit)" >&2
LB_COMMIT=$commit cargo build --release --locked -p renderer >&2
# The registrar is built for size (Cargo.toml, profile release-small).
LB_COMMIT=$commit cargo build --profile release-small --locked -p registrar >&2
gen=$(mktemp -d)
stage=$(mktemp -d)
trap 'rm -rf "$gen" "$stage"' EXIT
cargo run --release --locked -q -p dist -- "$gen" >&2
mkdir -p "$out"

# Reproducible: every file dated by the last commit.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
date_r=$(date -u -R -d "@$SOURCE_DATE_EPOCH")

# common PKG BIN DESCRIPTION: the parts every package has. Sets $root.
common() {
  local pkg=$1 bin=$2
  root="$stage/$pkg"
  install -d "$root/DEBIAN" "$root/usr/bin" "$root/usr/share/doc/$pkg" "$root/usr/share/man/man1" \
    "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
    "$root/usr/lib/systemd/system"
  local profile=release
  [ "$bin" = lb-registrar ] && profile=release-small
  install -m 0755 "target/$profile/$bin" "$root/usr/bin/$bin"
  gzip -9n <"$gen/$bin.1" >"$root/usr/share/man/man1/$bin.1.gz"
  install -m 0644 "$gen/$bin" "$root/usr/share/bash-completion/completions/$bin"
  install -m 0644 "$gen/_$bin" "$root/usr/share/zsh/vendor-completions/_$bin"
  cat >"$root/usr/share/doc/$pkg/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: lb-registry
Source: the lb-registry repository (commit $commit)

Files: *
Copyright: 2026 the lb-registry authors
License: Apache-2.0

License: Apache-2.0
 Licensed under the Apache License, Version 2.0 (the "License"); you may not use
 this file except in compliance with the License. You may obtain a copy of the
 License at http://www.apache.org/licenses/LICENSE-2.0
 .
 Unless required by applicable law or agreed to in writing, software distributed
 under the License is distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR
 CONDITIONS OF ANY KIND, either express or implied. See the License for the
 specific language governing permissions and limitations under the License.
 .
 On Debian systems, the complete text of the Apache License, Version 2.0 can be
 found in "/usr/share/common-licenses/Apache-2.0".
COPYRIGHT
  printf '%s (%s) unstable; urgency=medium\n\n  * Built from commit %s.\n\n -- lb-registry maintainers <maintainers@lb-registry.org>  %s\n' \
    "$pkg" "$version" "$commit" "$date_r" | gzip -9n >"$root/usr/share/doc/$pkg/changelog.gz"
  cat >"$root/DEBIAN/postinst" <<SCRIPT
#!/bin/sh
set -e
$4
# Units are installed, not enabled or started: starting lb-renderer takes over
# /etc/haproxy/haproxy.cfg, which an operator decides.
if [ "\$1" = configure ] && [ -d /run/systemd/system ]; then
  systemctl --system daemon-reload >/dev/null || true
fi
SCRIPT
  cat >"$root/DEBIAN/prerm" <<SCRIPT
#!/bin/sh
set -e
if [ "\$1" = remove ] && [ -d /run/systemd/system ]; then
  for unit in $3; do
    deb-systemd-invoke stop "\$unit" >/dev/null 2>&1 || true
  done
fi
SCRIPT
  cat >"$root/DEBIAN/postrm" <<SCRIPT
#!/bin/sh
set -e
$5
if [ -d /run/systemd/system ]; then
  systemctl --system daemon-reload >/dev/null || true
fi
SCRIPT
  chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"
}

# control PKG BIN DEPENDS-EXTRA SECTION-FIELDS…: writes DEBIAN/control with the shared
# library dependencies dpkg-shlibdeps finds for the binary.
control() {
  local pkg=$1 bin=$2 extra=$3 description=$4
  local shlibs
  shlibs=$(cd "$gen" && mkdir -p debian && printf 'Source: lb-registry\n\nPackage: %s\nArchitecture: any\n' "$pkg" >debian/control &&
    dpkg-shlibdeps -O "$root/usr/bin/$bin" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
  local size
  size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
  {
    echo "Package: $pkg"
    echo "Version: $version"
    echo "Architecture: $arch"
    echo "Maintainer: lb-registry maintainers <maintainers@lb-registry.org>"
    echo "Installed-Size: $size"
    echo "Depends: $shlibs"
    [ -z "$extra" ] || echo "$extra"
    echo "Section: net"
    echo "Priority: optional"
    echo "Homepage: https://github.com/lb-registry/lb-registry"
    printf 'Description: %s\n' "$description"
  } >"$root/DEBIAN/control"
  find "$root/etc" -type f 2>/dev/null | sed "s#^$root##" | sort >"$root/DEBIAN/conffiles"
  [ -s "$root/DEBIAN/conffiles" ] || rm -f "$root/DEBIAN/conffiles"
  (cd "$root" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | LC_ALL=C sort -z |
    xargs -0 md5sum >DEBIAN/md5sums)
  find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  local deb="$out/${pkg}_${version}_${arch}.deb"
  dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >&2
  echo "$deb"
}

# The dynamic-cookie key (HAProxy < 3.0's sticky sessions) is a secret: one generated per
# host at install, never shipped (copy it to every load balancer behind one address).
secret_postinst='# A secret dynamic-cookie key for this host, made once (not a conffile).
if [ "$1" = configure ] && [ ! -e /etc/lb-registry/secret.vars ]; then
  umask 077
  printf "# Generated at install. Every load balancer serving one address needs the same key.\ncookie_key=%s\n" \
    "$(od -An -N16 -tx1 /dev/urandom | tr -d " \n")" >/etc/lb-registry/secret.vars
fi'
secret_postrm='if [ "$1" = purge ]; then rm -f /etc/lb-registry/secret.vars; fi'
common lb-renderer lb-renderer "lb-renderer.service" "$secret_postinst" "$secret_postrm"
install -m 0644 deploy/debian/lb-renderer.service "$root/usr/lib/systemd/system/"
install -D -m 0644 deploy/debian/lb-renderer.default "$root/etc/default/lb-renderer"
install -D -m 0644 templates/haproxy.cfg.hbs "$root/etc/lb-registry/haproxy.cfg.hbs"
install -D -m 0644 -t "$root/usr/share/doc/lb-renderer/examples" templates/examples/*.hbs
renderer_deb=$(control lb-renderer lb-renderer "Recommends: haproxy (>= 2.6)
Suggests: etcd-server, etcd-client" "keeps HAProxy's backends in step with a registry in etcd
 lb-renderer watches a key prefix in etcd where lb-registrar keeps one JSON
 record per service instance, renders HAProxy's configuration from a
 Handlebars template, checks it with haproxy -c, writes it atomically and
 applies joins and leaves through HAProxy's runtime API (other changes through
 one confirmed graceful reload). Runs beside Debian's haproxy.service and
 reloads it through its master socket; SIGHUP reads the templates again.")

common lb-registrar lb-registrar "lb-registrar-docker.service" "" ""
install -m 0644 deploy/debian/lb-registrar@.service deploy/debian/lb-registrar-docker.service "$root/usr/lib/systemd/system/"
install -D -m 0644 deploy/debian/lb-registrar-docker.default "$root/etc/default/lb-registrar-docker"
install -D -m 0644 deploy/debian/example.env "$root/usr/share/doc/lb-registrar/examples/example.env"
install -d "$root/etc/lb-registrar"
registrar_deb=$(control lb-registrar lb-registrar "Suggests: etcd-client" "keeps a service instance registered in etcd under a TTL lease
 lb-registrar puts one JSON record per service instance into etcd under a
 lease it keeps alive, deregisters while the instance's health check fails,
 revokes the lease on a graceful stop and registers again after any lease
 loss. It runs beside an app (lb-registrar@NAME.service reads
 /etc/lb-registrar/NAME.env), as the app's parent (exec mode), or as
 lb-registrar docker, registering labelled containers from Docker's events.")

ls -l "$renderer_deb" "$registrar_deb" >&2
if [ "${NO_LINTIAN:-0}" != 1 ]; then
  echo "==> lintian" >&2
  # Errors fail; warnings and info are printed for the record.
  lintian --fail-on error --suppress-tags-from-file deploy/debian/lintian-overrides.txt \
    "$renderer_deb" "$registrar_deb" >&2
fi
echo "$renderer_deb"
echo "$registrar_deb"
