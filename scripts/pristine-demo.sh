#!/usr/bin/env bash
# Step 2 of scripts/pristine-check.sh, run inside the pristine root (its own network
# namespace): a system etcd holds 127.0.0.1:2379 as the etcd-server package's would;
# scripts/demo.sh must still come up, serve a web app through HAProxy, log no WARN and
# stop cleanly on SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."

etcd --data-dir /tmp/system-etcd >/tmp/system-etcd.log 2>&1 &
system_etcd=$!
for _ in $(seq 100); do
  ETCDCTL_API=3 etcdctl endpoint health >/dev/null 2>&1 && break
  sleep 0.1
done

export RUN_DIR=/tmp/demo PROFILE=dev
bash scripts/demo.sh >/tmp/demo.out 2>&1 &
demo=$!
fail() {
  echo "pristine demo: $*" >&2
  tail -n 30 /tmp/demo.out "$RUN_DIR"/*.log >&2 || true
  kill -TERM "$demo" "$system_etcd" 2>/dev/null || true
  exit 1
}
served=""
for _ in $(seq 600); do
  served=$(curl -fsS --max-time 2 http://127.0.0.1:8080/ 2>/dev/null || true)
  case "$served" in *'"id"'*) break ;; esac
  kill -0 "$demo" 2>/dev/null || fail "demo.sh exited before serving"
  sleep 0.2
done
case "$served" in *'"id"'*) ;; *) fail "nothing served through HAProxy on 127.0.0.1:8080 within 120 s" ;; esac
echo "served through HAProxy: $served"
grep -q "127.0.0.1:2379 is taken" /tmp/demo.out || fail "demo.sh did not say that the system etcd holds 2379"
kill -TERM "$demo"
wait "$demo" || true
if grep -h " WARN " "$RUN_DIR"/*.log; then
  fail "the demo logged WARN lines (above)"
fi
# This root has its own PID namespace: /proc lists only what runs in it.
for d in /proc/[0-9]*; do
  case "$(cat "$d/comm" 2>/dev/null)" in
    lb-renderer | lb-registrar | haproxy | webapp) fail "${d#/proc/} ($(cat "$d/comm")) left running after the demo stopped" ;;
  esac
done
kill -TERM "$system_etcd"
wait "$system_etcd" || true
echo "demo: up, served, no WARN, stopped cleanly"
