#!/usr/bin/env bash
# The packages as an operator meets them: installed with dpkg into a booted Debian root
# (systemd as PID 1 under systemd-nspawn, private network) that holds only Debian's own
# haproxy, etcd-server and systemd, run through their units with no file edited.
#
#   scripts/systemd-check.sh SUITE RENDERER_DEB REGISTRAR_DEB WEBAPP_BIN
#
# Checks, in order (each failure ends the run with the journal's tail):
#   1. install → a web app registered by lb-registrar@w1 is served through Debian's
#      haproxy.service; lb-renderer is READY (Type=notify) with a STATUS line;
#   2. a healthy start logged no WARN;
#   3. `systemctl reload lb-renderer` after a template edit → the edit is served, the
#      renderer's and HAProxy's master PIDs are unchanged;
#   4. a broken template + reload → still serving the last good config, the journal names
#      the template file, lb-renderer still running;
#   5. the renderer frozen (SIGSTOP) → killed and restarted by the watchdog (WatchdogSec=3s
#      in a drop-in), serving again;
#   6. `systemctl stop lb-registrar@w1` → out of etcd and of HAProxy within 3 s;
#   7. the registrar reload (SIGHUP) → still running, record still there.
# Prints one line per check and the timings; exit 0 only if every check passed.
set -euo pipefail
cd "$(dirname "$0")/.."
suite=${1:?usage: systemd-check.sh SUITE RENDERER_DEB REGISTRAR_DEB WEBAPP_BIN}
renderer_deb=${2:?} registrar_deb=${3:?} webapp_bin=${4:?}
[ "$(id -u)" -eq 0 ] || { echo "systemd-check: needs root (debootstrap, nspawn)" >&2; exit 1; }

root=$(FRESH=1 scripts/debian-root.sh "$suite" booted systemd,systemd-sysv,dbus,haproxy,etcd-server,curl)
nspawn_pid=""
cleanup() {
  if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
    # SIGTERM to systemd-nspawn powers the container off; SIGKILL if it takes too long.
    kill -TERM "$nspawn_pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$nspawn_pid" 2>/dev/null || true
    wait "$nspawn_pid" 2>/dev/null || true
  fi
  [ -n "$root" ] && rm -rf --one-file-system "$root"
}
trap cleanup EXIT

# An installed Debian has these; debootstrap writes no /etc/hosts (etcd.service needs
# `localhost`).
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
echo "lb-$suite" >"$root/etc/hostname"
# Not /tmp: systemd mounts a tmpfs over it at boot.
install -d "$root/opt/lb"
install -m 0644 "$renderer_deb" "$registrar_deb" "$root/opt/lb/"
install -m 0755 "$webapp_bin" "$root/usr/local/bin/webapp"
# The app the registrar sits beside: a unit of its own, as an operator's app has.
cat >"$root/etc/systemd/system/demo-webapp@.service" <<'UNIT'
[Unit]
Description=sample web app on port %i
[Service]
ExecStart=/usr/local/bin/webapp --bind 127.0.0.1 --port %i --id w1
DynamicUser=yes
UNIT

log=$(mktemp)
systemd-nspawn --register=no --keep-unit --private-network -D "$root" -b --console=pipe >"$log" 2>&1 &
nspawn_pid=$!

# The container's PID 1: systemd-nspawn's child running systemd.
leader=""
for _ in $(seq 200); do
  for c in $(pgrep -P "$nspawn_pid" 2>/dev/null); do
    [ "$(cat "/proc/$c/comm" 2>/dev/null)" = systemd ] && leader=$c
  done
  [ -n "$leader" ] && break
  sleep 0.05
done
[ -n "$leader" ] || { cat "$log" >&2; echo "FAIL boot: no container init" >&2; exit 1; }
in_root() { timeout 60 nsenter -t "$leader" -m -u -i -n -p -- "$@"; }

passed=0
fail() {
  echo "FAIL [$suite] $*" >&2
  in_root journalctl --no-pager -n 80 -u lb-renderer -u 'lb-registrar@*' -u haproxy -u etcd >&2 || true
  echo "systemd-check $suite: $passed passed, 1 failed" >&2
  exit 1
}
ok() { passed=$((passed + 1)); echo "ok   [$suite] $*" >&2; }
now_ms() { date +%s%3N; }
# until_ok SECONDS COMMAND…: polls COMMAND every 50 ms until it succeeds or time runs out.
until_ok() {
  local limit=$(($(now_ms) + $1 * 1000))
  shift
  until "$@" >/dev/null 2>&1; do
    [ "$(now_ms)" -lt "$limit" ] || return 1
    sleep 0.05
  done
}

# Until systemd answers on its bus (is-system-running fails before), then until booted.
until_ok 30 in_root systemctl is-system-running || true
timeout 60 nsenter -t "$leader" -m -u -i -n -p -- systemctl is-system-running --wait >/dev/null 2>&1 || true
state=$(in_root systemctl is-system-running 2>/dev/null || true)
active() { for u in "$@"; do in_root systemctl is-active --quiet "$u" || return 1; done; }
until_ok 60 active etcd haproxy || fail "Debian's etcd and haproxy units are not active (system $state)"
ok "booted $(in_root sh -c '. /etc/os-release; echo $PRETTY_NAME') ($state): $(in_root haproxy -v | head -1 | cut -d' ' -f1-3), etcd $(in_root etcd --version | head -1 | awk '{print $3}')"

# 1. install → served.
t0=$(now_ms)
in_root dpkg -i /opt/lb/$(basename "$renderer_deb") /opt/lb/$(basename "$registrar_deb") >/dev/null || fail "dpkg -i"
in_root systemctl start lb-renderer || fail "systemctl start lb-renderer"
in_root systemctl start demo-webapp@8001
printf 'REGISTRAR_SERVICE=webapp\nREGISTRAR_ADDRESS=127.0.0.1\nREGISTRAR_PORT=8001\nREGISTRAR_HEALTH_HTTP=http://127.0.0.1:8001/health\nREGISTRAR_HEALTH_INTERVAL=500ms\nREGISTRAR_TTL=5s\n' \
  >"$root/etc/lb-registrar/w1.env"
in_root systemctl start lb-registrar@w1 || fail "systemctl start lb-registrar@w1"
# Pipelines into grep read all input (no -q): with pipefail, grep -q quitting early makes
# the writer die of SIGPIPE and the pipeline fail even on a match.
served() { in_root curl -fsS --max-time 2 http://127.0.0.1/ | grep '"id":"w1"' >/dev/null; }
until_ok 30 served || fail "w1 not served through Debian's haproxy.service"
t1=$(now_ms)
status=$(in_root systemctl show -p StatusText --value lb-renderer)
case "$status" in revision*) ;; *) fail "lb-renderer's STATUS is '$status'" ;; esac
ok "installed → served through haproxy.service in $((t1 - t0)) ms; lb-renderer STATUS: $status; lb-registrar@w1 STATUS: $(in_root systemctl show -p StatusText --value lb-registrar@w1)"

# 2. quiet when healthy.
warns=$(in_root journalctl --no-pager -o cat -u lb-renderer -u lb-registrar@w1 | grep -E ' WARN |"level":"WARN"' || true)
[ -z "$warns" ] || fail "a healthy start logged WARN: $warns"
ok "a healthy start logged no WARN"

# 3. reload after a template edit.
main_pid() { in_root systemctl show -p MainPID --value "$1"; }
renderer_pid=$(main_pid lb-renderer)
haproxy_pid=$(main_pid haproxy)
tpl=/etc/lb-registry/haproxy.cfg.hbs
sed -i 's|^    default_backend nodes$|    http-response set-header X-LB-Template v2\n    default_backend nodes|' "$root$tpl"
grep -q 'X-LB-Template v2' "$root$tpl" || fail "could not edit the template"
in_root systemctl reload lb-renderer || fail "systemctl reload lb-renderer"
edited() { in_root curl -fsS -D - -o /dev/null --max-time 2 http://127.0.0.1/ | grep -i '^x-lb-template: v2' >/dev/null; }
until_ok 20 edited || fail "the edited template is not served after systemctl reload"
[ "$(main_pid lb-renderer)" = "$renderer_pid" ] || fail "lb-renderer was restarted by reload"
[ "$(main_pid haproxy)" = "$haproxy_pid" ] || fail "HAProxy's master was restarted by reload"
ok "systemctl reload lb-renderer: edit served; renderer PID $renderer_pid and HAProxy master PID $haproxy_pid unchanged"

# 4. broken template → last good config kept, journal names the file.
cp "$root$tpl" "$root$tpl.good"
printf 'global\n{{#each services}}\n' >>"$root$tpl"
in_root systemctl reload lb-renderer || fail "systemctl reload lb-renderer (broken template)"
named() { in_root journalctl --no-pager -o cat -u lb-renderer | grep -E 'ERROR' | grep -F "$tpl" >/dev/null; }
until_ok 10 named || fail "no ERROR naming $tpl in the journal"
# Polled: right after step 3's reload the old worker may still answer a request or two.
until_ok 10 edited || fail "not serving the last good config after a broken template: $(in_root curl -sS -D - --max-time 2 http://127.0.0.1/ 2>&1 | head -12)"
active lb-renderer || fail "lb-renderer stopped after a broken template"
[ "$(main_pid lb-renderer)" = "$renderer_pid" ] || fail "lb-renderer restarted after a broken template"
ok "broken template: still serving, journal: $(in_root journalctl --no-pager -o cat -u lb-renderer | grep ERROR | grep "$tpl" | tail -1 | cut -c1-160)"
cp "$root$tpl.good" "$root$tpl"

# 5. watchdog.
mkdir -p "$root/etc/systemd/system/lb-renderer.service.d"
printf '[Service]\nWatchdogSec=3s\n' >"$root/etc/systemd/system/lb-renderer.service.d/watchdog.conf"
in_root systemctl daemon-reload
in_root systemctl restart lb-renderer || fail "restart with WatchdogSec=3s"
frozen=$(main_pid lb-renderer)
sleep_ms_start=$(now_ms)
in_root sh -c "kill -STOP $frozen"
restarted() {
  local p
  p=$(main_pid lb-renderer)
  [ -n "$p" ] && [ "$p" != 0 ] && [ "$p" != "$frozen" ] && active lb-renderer
}
until_ok 40 restarted || fail "the frozen renderer was not restarted by the watchdog"
took=$(($(now_ms) - sleep_ms_start))
in_root journalctl --no-pager -o cat -u lb-renderer | grep -i 'watchdog timeout' >/dev/null || fail "no watchdog timeout in the journal"
until_ok 20 edited || fail "not serving after the watchdog restart"
ok "frozen renderer (PID $frozen) restarted by the watchdog after $took ms, serving"
rm -rf "$root/etc/systemd/system/lb-renderer.service.d"
in_root systemctl daemon-reload

# 7 (before 6, while registered). registrar SIGHUP.
reg_pid=$(main_pid lb-registrar@w1)
in_root systemctl reload lb-registrar@w1 || fail "systemctl reload lb-registrar@w1"
until_ok 5 sh -c "nsenter -t $leader -m -u -i -n -p -- journalctl --no-pager -o cat -u lb-registrar@w1 | grep 'putting the record again' >/dev/null" ||
  fail "the registrar did not act on SIGHUP"
[ "$(main_pid lb-registrar@w1)" = "$reg_pid" ] || fail "lb-registrar@w1 restarted on reload"
served || fail "w1 not served after the registrar's reload"
ok "systemctl reload lb-registrar@w1: record put again, same PID, served"

# 6. stop the registrar → out within 3 s.
t0=$(now_ms)
in_root systemctl stop lb-registrar@w1
gone() {
  [ -z "$(in_root etcdctl --endpoints=http://127.0.0.1:2379 get --prefix /services/webapp/ --keys-only)" ] &&
    [ "$(in_root curl -s -o /dev/null -w '%{http_code}' --max-time 2 http://127.0.0.1/)" = 503 ]
}
until_ok 3 gone || fail "w1 still in etcd or HAProxy 3 s after systemctl stop lb-registrar@w1"
ok "systemctl stop lb-registrar@w1 → out of etcd and HAProxy in $(($(now_ms) - t0)) ms"

echo "systemd-check $suite: $passed passed, 0 failed" >&2
