#!/usr/bin/env bash
# Starts the whole system locally on loopback: etcd, HAProxy + renderer, and N demo web
# apps each run by a registrar. Ctrl-C stops everything this script started.
#
#   scripts/demo.sh            # 3 web apps
#   WEBAPPS=5 scripts/demo.sh  # 5 web apps
#
# Ports (override with the environment): etcd 2379 (or the next free pair when a system
# etcd holds it), HAProxy traffic 8080, stats 1936, web apps from 3001 up.
# PROFILE=dev builds without optimisations (quicker to build).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh

WEBAPPS=${WEBAPPS:-3}
HTTP_PORT=${HTTP_PORT:-8080}
STATS_PORT=${STATS_PORT:-1936}
APP_BASE_PORT=${APP_BASE_PORT:-3001}
PROFILE=${PROFILE:-release}
RUN_DIR=${RUN_DIR:-$(mktemp -d -t lb-demo-XXXX)}
mkdir -p "$RUN_DIR"
# Sticky-session cookies on HAProxy < 3.0 are derived from this key: a fresh random one
# per demo, never the template's public fallback.
COOKIE_KEY=${COOKIE_KEY:-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')}

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if [ -z "${ETCD_PORT:-}" ]; then
  # The etcd-server package starts a system etcd on 2379 (and 2380) where systemd runs:
  # leave it alone and give the demo's etcd the next free pair.
  ETCD_PORT=2379
  while port_taken "$ETCD_PORT" || port_taken $((ETCD_PORT + 1)); do ETCD_PORT=$((ETCD_PORT + 10)); done
  [ "$ETCD_PORT" = 2379 ] || echo "==> 127.0.0.1:2379 is taken (a system etcd from the etcd-server package?); the demo's etcd uses $ETCD_PORT" >&2
fi
for p in "$ETCD_PORT" $((ETCD_PORT + 1)) "$HTTP_PORT" "$STATS_PORT" $(seq "$APP_BASE_PORT" $((APP_BASE_PORT + WEBAPPS - 1))); do
  if port_taken "$p"; then
    echo "error: 127.0.0.1:$p is already in use; choose other ports (ETCD_PORT, HTTP_PORT, STATS_PORT, APP_BASE_PORT)" >&2
    exit 1
  fi
done
ENDPOINT="http://127.0.0.1:${ETCD_PORT}"
export ETCDCTL_API=3

echo "==> building ($PROFILE)" >&2
if [ "$PROFILE" = release ]; then
  cargo build --release --locked -p registrar -p renderer -p webapp
else
  cargo build --locked -p registrar -p renderer -p webapp
fi
BIN=target/$PROFILE
[ "$PROFILE" = dev ] && BIN=target/debug

pids=()
cleanup() {
  trap - EXIT INT TERM  # run once, whichever signal or exit got here
  echo "==> stopping" >&2
  # The load balancer first (the demo is over: its backend is not emptied on the way
  # down, which would hold the servers for --empty-hold and warn), then the web apps
  # (graceful: leases revoked), then etcd: each waited for, so nothing logs a lost etcd
  # connection on the way down. pids: etcd, renderer, web apps.
  order=()
  [ ${#pids[@]} -gt 1 ] && order+=(1)
  for ((i=${#pids[@]}-1; i>=2; i--)); do order+=("$i"); done
  [ ${#pids[@]} -gt 0 ] && order+=(0)
  for i in "${order[@]}"; do
    kill -TERM "${pids[$i]}" 2>/dev/null || true
    wait "${pids[$i]}" 2>/dev/null || true
  done
  echo "logs were in $RUN_DIR" >&2
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

echo "==> etcd on $ENDPOINT (data in $RUN_DIR/etcd)" >&2
etcd --name demo --data-dir "$RUN_DIR/etcd" \
  --listen-client-urls "$ENDPOINT" --advertise-client-urls "$ENDPOINT" \
  --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
  --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
  --initial-cluster "demo=http://127.0.0.1:$((ETCD_PORT + 1))" \
  >"$RUN_DIR/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  etcdctl --endpoints "$ENDPOINT" endpoint health >/dev/null 2>&1 && break
  sleep 0.1
done

echo "==> HAProxy + renderer: traffic on 127.0.0.1:$HTTP_PORT, stats on http://127.0.0.1:$STATS_PORT/" >&2
mkdir -p "$RUN_DIR/haproxy"
"$BIN/lb-renderer" --endpoints "$ENDPOINT" \
  --template "templates/haproxy.cfg.hbs:$RUN_DIR/haproxy/haproxy.cfg" \
  --var "http_port=$HTTP_PORT" --var "stats_port=$STATS_PORT" \
  --var "bind_address=127.0.0.1" --var "runtime_dir=$RUN_DIR/haproxy" \
  --var "cookie_key=$COOKIE_KEY" \
  -- haproxy -W -db -f "$RUN_DIR/haproxy/haproxy.cfg" \
    >"$RUN_DIR/renderer.log" 2>&1 &
pids+=($!)

for i in $(seq 1 "$WEBAPPS"); do
  port=$((APP_BASE_PORT + i - 1))
  echo "==> web app s$i on 127.0.0.1:$port (registrar in exec mode)" >&2
  "$BIN/lb-registrar" --endpoints "$ENDPOINT" --service webapp --id "s$i" \
    --address 127.0.0.1 --port "$port" --ttl 5s \
    --health-http "http://127.0.0.1:$port/health" --health-interval 1s \
    -- "$BIN/webapp" --bind 127.0.0.1 --port "$port" --id "s$i" \
    >"$RUN_DIR/webapp-s$i.log" 2>&1 &
  pids+=($!)
done

# Wait (bounded) until every web app is registered and HAProxy answers.
for _ in $(seq 150); do
  n=$(etcdctl --endpoints "$ENDPOINT" get --prefix /services/ --keys-only 2>/dev/null | grep -c . || true)
  [ "$n" -ge "$WEBAPPS" ] && curl -fsS -o /dev/null "http://127.0.0.1:$HTTP_PORT/" 2>/dev/null && break
  sleep 0.2
done
echo "==> registered instances (etcdctl get --prefix /services/):" >&2
etcdctl --endpoints "$ENDPOINT" get --prefix /services/ --print-value-only
echo "==> generated config: $RUN_DIR/haproxy/haproxy.cfg" >&2
echo "==> try:  curl -s http://127.0.0.1:$HTTP_PORT/   (repeat: round robin)" >&2
echo "==>       curl -s http://127.0.0.1:$STATS_PORT/   (HAProxy stats page)" >&2
echo "==> running; logs in $RUN_DIR. Ctrl-C to stop." >&2
wait
