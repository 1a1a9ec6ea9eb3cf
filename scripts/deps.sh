# Sourced by the other scripts: installs what building and running need, if missing.
# Debian/Ubuntu: etcd (server + etcdctl), HAProxy, protoc (etcd-client's build), wrk, curl.

need_apt=()
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need_apt+=(etcd-client)
command -v haproxy >/dev/null 2>&1 || need_apt+=(haproxy)
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
# etcd-client's build script compiles etcd's .proto files, which import protobuf's
# well-known types (google/protobuf/descriptor.proto): those ship in libprotobuf-dev, a
# "recommends" of protobuf-compiler that --no-install-recommends leaves out.
[ -f /usr/include/google/protobuf/descriptor.proto ] || need_apt+=(libprotobuf-dev)
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# The container tests build images locally (debootstrap) and drive docker-compose.
command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)
command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)
# Partition tests: network namespaces, veth links and iptables inside the namespace.
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v iptables >/dev/null 2>&1 || need_apt+=(iptables)
# Packaging: the .debs are checked with lintian and installed into booted Debian roots
# (systemd-nspawn); the alert rules are unit-tested with promtool (Debian's prometheus).
command -v lintian >/dev/null 2>&1 || need_apt+=(lintian)
command -v dpkg-shlibdeps >/dev/null 2>&1 || need_apt+=(dpkg-dev)
command -v systemd-nspawn >/dev/null 2>&1 || need_apt+=(systemd-container)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> installing ${need_apt[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  # Debian's packages try to start their services; the scripts start their own instances.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >&2
  # The etcd package starts a system etcd on 127.0.0.1:2379 where init allows it; ours
  # use their own ports, so leave it be.
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found; install a Rust toolchain (1.85 or newer, e.g. with rustup)" >&2
  exit 1
fi
