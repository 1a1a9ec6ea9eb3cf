#!/usr/bin/env bash
# A secured etcd for the registry: TLS with client certificates, authentication, and
# least-privilege roles.
#
#   deploy/etcd-secure.sh certs DIR
#       CA, server certificate (SAN 127.0.0.1, localhost, etcd) and client certificates
#       for the registrar and the renderer, in DIR.
#   deploy/etcd-secure.sh auth ENDPOINT DIR [PREFIX]
#       On a running etcd started with the certificates (see below): users and roles, then
#       `auth enable`. Passwords are generated into DIR/<user>.password (mode 600).
#         root       everything (keep its password offline)
#         registrar  role registrar: read+write under PREFIX/ (default /services)
#         renderer   role renderer:  read-only under PREFIX/
#
# Start etcd with:
#   etcd --cert-file DIR/server.crt --key-file DIR/server.key \
#        --trusted-ca-file DIR/ca.crt --client-cert-auth \
#        --listen-client-urls https://127.0.0.1:2379 --advertise-client-urls https://127.0.0.1:2379
# and point both binaries at it:
#   registrar --endpoints https://127.0.0.1:2379 --cacert DIR/ca.crt \
#             --cert DIR/registrar.crt --key DIR/registrar.key \
#             --user registrar --password-file DIR/registrar.password ...
set -euo pipefail

cmd=${1:-}
case "$cmd" in
certs)
  dir=${2:?usage: $0 certs DIR}
  mkdir -p "$dir"
  cd "$dir"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=lb-registry test CA" \
    -keyout ca.key -out ca.crt 2>/dev/null
  issue() { # name CN SAN
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$3" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile "$1.ext" -out "$1.crt" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
  }
  issue server etcd "IP:127.0.0.1,DNS:localhost,DNS:etcd"
  issue registrar registrar "DNS:registrar"
  issue renderer renderer "DNS:renderer"
  issue root root "DNS:root"
  chmod 600 ./*.key
  echo "certificates in $dir" >&2
  ;;
auth)
  endpoint=${2:?usage: $0 auth ENDPOINT DIR [PREFIX]}
  dir=${3:?usage: $0 auth ENDPOINT DIR [PREFIX]}
  prefix=${4:-/services}
  prefix=${prefix%/}
  ctl() {
    ETCDCTL_API=3 etcdctl --endpoints "$endpoint" --cacert "$dir/ca.crt" \
      --cert "$dir/root.crt" --key "$dir/root.key" "$@"
  }
  for user in root registrar renderer; do
    [ -s "$dir/$user.password" ] || { head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$dir/$user.password"; chmod 600 "$dir/$user.password"; }
  done
  ctl user add root --new-user-password "$(cat "$dir/root.password")" >/dev/null
  ctl user grant-role root root >/dev/null
  ctl role add registrar >/dev/null
  ctl role grant-permission registrar --prefix=true readwrite "$prefix/" >/dev/null
  ctl role add renderer >/dev/null
  ctl role grant-permission renderer --prefix=true read "$prefix/" >/dev/null
  for user in registrar renderer; do
    ctl user add "$user" --new-user-password "$(cat "$dir/$user.password")" >/dev/null
    ctl user grant-role "$user" "$user" >/dev/null
  done
  ctl auth enable >/dev/null
  echo "auth enabled: users root, registrar (readwrite $prefix/), renderer (read $prefix/)" >&2
  ;;
*)
  sed -n '2,25p' "$0" >&2
  exit 64
  ;;
esac
