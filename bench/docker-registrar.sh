#!/usr/bin/env bash
# registrar docker at N containers (default 50): register latency (`docker run` started →
# key put in etcd), deregister latency (`docker stop` / `docker kill` started → key
# deleted), and the daemon's RSS with N registered.
#
#   cargo build --release -p registrar && PROFILE=debug deploy/images.sh
#   N=50 bench/docker-registrar.sh
#
# Times come from an `etcdctl watch` stamped as each event arrives. Needs a Docker engine,
# etcd and etcdctl; uses its own etcd on free ports and removes its containers.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-50}
BIN=${BIN:-target/release/lb-registrar}
tag="bdk$$"
dir=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
cport=$(free_port); pport=$(free_port)
ep="http://127.0.0.1:$cport"
pids=()
cleanup() {
  docker ps -aq --filter "name=$tag-" | xargs -r docker rm -f >/dev/null 2>&1 || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  pkill -f "watch --prefix /services/$tag/" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
etcd --name b --data-dir "$dir/etcd" --listen-client-urls "$ep" --advertise-client-urls "$ep" \
  --listen-peer-urls "http://127.0.0.1:$pport" --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
  --initial-cluster "b=http://127.0.0.1:$pport" >"$dir/etcd.log" 2>&1 &
pids+=($!)
until etcdctl --endpoints "$ep" endpoint health >/dev/null 2>&1; do sleep 0.1; done
"$BIN" docker --endpoints "$ep" --ttl 10s --owner "$tag" >"$dir/daemon.log" 2>&1 &
daemon=$!
pids+=("$daemon")
stamp() { while IFS= read -r line; do printf '%s %s\n' "$(date +%s.%N)" "$line"; done; }
etcdctl --endpoints "$ep" watch --prefix "/services/$tag/" | stamp >"$dir/watch.log" &
pids+=($!)
sleep 1

: >"$dir/start.log"
for i in $(seq 1 "$N"); do
  printf '%s %s-%s\n' "$(date +%s.%N)" "$tag" "$i" >>"$dir/start.log"
  docker run -d --name "$tag-$i" --label "lb-registry.service=$tag" \
    --entrypoint /usr/local/bin/webapp lb-registry/webapp:latest >/dev/null
done
until [ "$(etcdctl --endpoints "$ep" get --prefix "/services/$tag/" --keys-only | grep -c .)" -ge "$N" ]; do sleep 0.2; done
rss=$(awk '/VmRSS/ {print $2}' "/proc/$daemon/status")

: >"$dir/stop.log"
half=$((N / 2))
for i in $(seq 1 "$N"); do
  printf '%s %s-%s\n' "$(date +%s.%N)" "$tag" "$i" >>"$dir/stop.log"
  if [ "$i" -le "$half" ]; then docker stop -t 5 "$tag-$i" >/dev/null; else docker kill "$tag-$i" >/dev/null; fi
done
until [ "$(etcdctl --endpoints "$ep" get --prefix "/services/$tag/" --keys-only | grep -c .)" -eq 0 ]; do sleep 0.2; done
sleep 0.5

# watch.log: "<t> PUT" / "<t> <key>" / "<t> <value>" and "<t> DELETE" / "<t> <key>" / "<t>".
awk -v half="$half" -v n="$N" -v rss="$rss" '
  FILENAME ~ /start.log/ { start[$2] = $1; next }
  FILENAME ~ /stop.log/  { stop[$2] = $1; next }
  $2 == "PUT" || $2 == "DELETE" { op = $2; next }
  op != "" && $2 ~ /^\/services\// {
    n1 = split($2, p, "/"); c = p[n1]
    if (op == "PUT" && !(c in put)) put[c] = $1
    if (op == "DELETE" && !(c in del)) del[c] = $1
    op = ""; next
  }
  END {
    for (c in put) if (c in start) r[++nr] = (put[c] - start[c]) * 1000
    for (c in del) if (c in stop) {
      split(c, q, "-"); i = q[length(q)] + 0
      if (i <= half) s[++ns] = (del[c] - stop[c]) * 1000; else k[++nk] = (del[c] - stop[c]) * 1000
    }
    printf "containers: %d, daemon RSS with all registered: %.1f MiB\n", n, rss / 1024
    report("register (docker run started -> key put)", r, nr)
    report("deregister on docker stop (-> key deleted)", s, ns)
    report("deregister on docker kill (-> key deleted)", k, nk)
  }
  function report(what, a, m,   i, j, t) {
    for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
    if (m == 0) { printf "%s: no samples\n", what; return }
    printf "%s: n=%d p50 %.0f ms, p90 %.0f ms, max %.0f ms\n", what, m, a[int((m + 1) / 2)], a[int(m * 0.9 + 0.5)], a[m]
  }
' "$dir/start.log" "$dir/stop.log" "$dir/watch.log"
