#!/usr/bin/env bash
# A production-shaped system on loopback: a three-member etcd cluster, two load balancers
# (HAProxy + renderer) and N web apps. Ctrl-C stops everything this script started.
#
#   scripts/demo-cluster.sh            # 3 web apps; load balancers on 8081 and 8082
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh

WEBAPPS=${WEBAPPS:-3}
RUN_DIR=${RUN_DIR:-$(mktemp -d -t lb-cluster-XXXX)}
# One random sticky-cookie secret shared by both load balancers (HAProxy < 3.0).
COOKIE_KEY=${COOKIE_KEY:-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')}
mkdir -p "$RUN_DIR"
cargo build --release --locked -p registrar -p renderer -p webapp
BIN=target/release

pids=()
cleanup() {
  trap - EXIT INT TERM  # run once, whichever signal or exit got here
  # Web apps, then load balancers, then etcd members, each waited for.
  for ((i=${#pids[@]}-1; i>=0; i--)); do
    kill -TERM "${pids[$i]}" 2>/dev/null || true
    wait "${pids[$i]}" 2>/dev/null || true
  done
  echo "logs were in $RUN_DIR" >&2
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

cluster="m1=http://127.0.0.1:23801,m2=http://127.0.0.1:23802,m3=http://127.0.0.1:23803"
for i in 1 2 3; do
  etcd --name "m$i" --data-dir "$RUN_DIR/etcd-m$i" \
    --listen-client-urls "http://127.0.0.1:2379$i" --advertise-client-urls "http://127.0.0.1:2379$i" \
    --listen-peer-urls "http://127.0.0.1:2380$i" --initial-advertise-peer-urls "http://127.0.0.1:2380$i" \
    --initial-cluster "$cluster" --initial-cluster-token lb-demo >"$RUN_DIR/etcd-m$i.log" 2>&1 &
  pids+=($!)
done
ENDPOINTS=http://127.0.0.1:23791,http://127.0.0.1:23792,http://127.0.0.1:23793
for _ in $(seq 100); do
  ETCDCTL_API=3 etcdctl --endpoints "$ENDPOINTS" endpoint health >/dev/null 2>&1 && break
  sleep 0.2
done
echo "==> etcd cluster: $ENDPOINTS" >&2

for n in 1 2; do
  mkdir -p "$RUN_DIR/lb$n"
  "$BIN/lb-renderer" --endpoints "$ENDPOINTS" --metrics-addr "127.0.0.1:910$n" \
    --template "templates/haproxy.cfg.hbs:$RUN_DIR/lb$n/haproxy.cfg" \
    --var "http_port=808$n" --var "stats_port=193$n" --var bind_address=127.0.0.1 \
    --var "runtime_dir=$RUN_DIR/lb$n" --var "cookie_key=$COOKIE_KEY" \
    -- haproxy -W -db -f "$RUN_DIR/lb$n/haproxy.cfg" >"$RUN_DIR/lb$n/renderer.log" 2>&1 &
  pids+=($!)
  echo "==> load balancer $n: traffic 127.0.0.1:808$n, stats 127.0.0.1:193$n, metrics 127.0.0.1:910$n" >&2
done

for i in $(seq 1 "$WEBAPPS"); do
  port=$((3100 + i))
  "$BIN/lb-registrar" --endpoints "$ENDPOINTS" --service webapp --id "s$i" --address 127.0.0.1 \
    --port "$port" --ttl 5s --health-http "http://127.0.0.1:$port/health" --health-interval 1s \
    -- "$BIN/webapp" --bind 127.0.0.1 --port "$port" --id "s$i" >"$RUN_DIR/webapp-s$i.log" 2>&1 &
  pids+=($!)
done
echo "==> $WEBAPPS web apps registered through the cluster; try: curl -s 127.0.0.1:8081/ ; curl -s 127.0.0.1:8082/" >&2
echo "==> kill a member: kill \$(pgrep -f 'etcd --name m1'); the system keeps working. Ctrl-C to stop." >&2
wait
