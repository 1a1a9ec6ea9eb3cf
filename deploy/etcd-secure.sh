#!/usr/bin/env bash
# A secured etcd for the registry: TLS with client certificates, authentication, and
# least-privilege roles.
#
#   deploy/etcd-secure.sh certs DIR
#       CA, server certificate (SAN 127.0.0.1, localhost, etcd) and client certificates
#       for the registrar and the renderer, in DIR.
#   deploy/etcd-secure.sh auth ENDPOINT DIR [PREFIX [SERVICE...]]
#       On a running etcd started with the certificates (see below): users and roles, then
#       `auth enable`. Passwords are generated into DIR/<user>.password (mode 600).
#       SERVICEs default to webapp. Least privilege, one role per concern:
#         user               role(s)                   may
#         root               root                      everything (keep it offline)
#         registrar-<svc>    registrar-<svc>           read+write PREFIX/<svc>/ only
#         registrar          registrar-<svc>, each     the same, for every SERVICE listed
#                                                      (one app's registrar: use the first)
#         registrar-docker   registrar-<svc>, each;    its services, and read PREFIX/ (it
#                            lister                    lists to remove its own stale keys)
#         operator           operator                  read+write PREFIX/_admin/, read PREFIX/
#         renderer           lister                    read PREFIX/ (never writes)
#       A web app's credentials cannot write another service's records or lift their own
#       maintenance; the renderer cannot write at all.
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
  usage="usage: $0 auth ENDPOINT DIR [PREFIX [SERVICE...]]"
  endpoint=${2:?$usage}
  dir=${3:?$usage}
  prefix=${4:-/services}
  prefix=${prefix%/}
  shift $(( $# < 4 ? $# : 4 ))
  services=("$@")
  [ ${#services[@]} -gt 0 ] || services=(webapp)
  for svc in "${services[@]}"; do
    [[ $svc =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$ ]] || { echo "invalid service name: $svc" >&2; exit 64; }
  done
  ctl() {
    ETCDCTL_API=3 etcdctl --endpoints "$endpoint" --cacert "$dir/ca.crt" \
      --cert "$dir/root.crt" --key "$dir/root.key" "$@"
  }
  password() { # user: the password file, made once
    [ -s "$dir/$1.password" ] || { head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$dir/$1.password"; chmod 600 "$dir/$1.password"; }
  }
  user() { # name role...
    local name=$1; shift
    password "$name"
    ctl user add "$name" --new-user-password "$(cat "$dir/$name.password")" >/dev/null
    for role in "$@"; do ctl user grant-role "$name" "$role" >/dev/null; done
  }
  password root
  ctl user add root --new-user-password "$(cat "$dir/root.password")" >/dev/null
  ctl user grant-role root root >/dev/null
  roles=()
  for svc in "${services[@]}"; do
    ctl role add "registrar-$svc" >/dev/null
    ctl role grant-permission "registrar-$svc" --prefix=true readwrite "$prefix/$svc/" >/dev/null
    roles+=("registrar-$svc")
  done
  ctl role add lister >/dev/null
  ctl role grant-permission lister --prefix=true read "$prefix/" >/dev/null
  ctl role add operator >/dev/null
  ctl role grant-permission operator --prefix=true readwrite "$prefix/_admin/" >/dev/null
  ctl role grant-permission operator --prefix=true read "$prefix/" >/dev/null
  for svc in "${services[@]}"; do user "registrar-$svc" "registrar-$svc"; done
  user registrar "${roles[@]}"
  user registrar-docker "${roles[@]}" lister
  user operator operator
  user renderer lister
  ctl auth enable >/dev/null
  echo "auth enabled under $prefix/: registrar-<svc> and registrar (read+write ${services[*]/%//}), registrar-docker (those + read), operator (read+write _admin/, read), renderer (read)" >&2
  ;;
*)
  sed -n '2,/^set -euo/p' "$0" | sed '$d' >&2
  exit 64
  ;;
esac
