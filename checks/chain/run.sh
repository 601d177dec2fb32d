#!/usr/bin/env bash
# Chain test under real systemd: a Debian trixie root (debootstrap, cached)
# with valkey-server and our .deb, booted with systemd-nspawn (systemd as
# PID 1, private network), driven with nsenter + systemctl. Proves, from
# systemd's own state and timestamps:
#   - each downstream unit started only after the api reported ready;
#   - the api does not become active while Valkey does not answer, and
#     does once it answers;
#   - the seed's grpcurl smoke check passes inside the container;
#   - kill -9 of the api: systemd restarts it, the websocketmanager
#     re-handshakes by itself (same PID) and is ready again, no
#     acknowledged state is lost;
#   - a reboot keeps state (Valkey appendonly) and the websocketmanager's
#     connections come back;
#   - a native worker (the DevKit example, in virtufin-worker-host) answers
#     under the unit's sandbox, and its gateway_call reaches the
#     websocketmanager through the api's Gateway;
#   - API keys as systemd credentials: the downstream services become ready
#     presenting their own keys, a call without a key is refused, the
#     Gateway reaches both downstream services by reflection, a bound key
#     cannot touch another service's state, the journal's audit lines name
#     the caller;
#   - each unit's `systemd-analyze security` exposure is at most 2.0;
#   - socket activation (sockets_* below): the six socket units are active
#     and the services took their listeners; a continuous client
#     (virtufin-callprobe: gRPC HealthCheck + GetState and HTTP /health, a
#     fresh connection per round) through `systemctl restart virtufin-api`,
#     `kill -9` of the api and a reinstall of the .deb sees 0 refused
#     connections, 0 timeouts, every call answered (a gRPC or HTTP status);
#     broken connections only for the calls in flight in the process killed
#     by kill -9 (at most one per loop), none on restart or reinstall;
#   - reload without restart (reload_* below): `systemctl reload` after a key
#     is added makes it work with the same PID; a broken keys file is
#     refused (STATUS= and the journal say so) and the old keys keep working;
# and prints start-to-ready time and idle RSS. Needs root.
set -euo pipefail
cd "$(dirname "$0")/../.."

CACHE=${VIRTUFIN_CHAIN_CACHE:-/var/tmp/virtufin-chain}
PACKAGES=systemd,systemd-sysv,dbus,valkey-server,ca-certificates,python3
# The cached root is keyed by its package list.
BASE=$CACHE/base-trixie-$(echo "$PACKAGES" | md5sum | cut -c1-8)
# A run root of its own (VIRTUFIN_CHAIN_WORK) lets two runs share the cache.
WORK=${VIRTUFIN_CHAIN_WORK:-$CACHE/run}
# Where cargo puts its output (CARGO_TARGET_DIR, as cargo reads it).
TARGET=${CARGO_TARGET_DIR:-target}
MIRROR=${VIRTUFIN_CHAIN_MIRROR:-http://deb.debian.org/debian}
UNITS="virtufin-api virtufin-websocketmanager virtufin-workmanager"
failures=0
passes=0

say() { printf '== %s\n' "$*"; }
pass() { printf 'PASS  %s\n' "$*"; passes=$((passes + 1)); }
fail() { printf 'FAIL  %s\n' "$*"; failures=$((failures + 1)); }
check() { local what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }

apt_updated=""
need() {
  command -v "$1" >/dev/null && return 0
  say "installing $2"
  [ -n "$apt_updated" ] || { apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}
need debootstrap debootstrap
need systemd-nspawn systemd-container
command -v cargo-deb >/dev/null || { say "installing cargo-deb"; cargo install --locked --quiet cargo-deb; }

say "building release binaries and the .deb"
# The workmanager package also builds virtufin-worker-host (its native host).
cargo build --release --locked -p virtufin -p virtufin-api -p virtufin-websocketmanager -p virtufin-workmanager -p virtufin-testkit --bins
# The example native worker (a cdylib) the chain test runs.
cargo build --release --locked -p virtufin-worker-example-echo
cargo deb -p virtufin --no-build --locked >/dev/null
DEB=$(ls -t "$TARGET"/debian/virtufin_*.deb | head -1)
pass "cargo deb -p virtufin built $(basename "$DEB")"

if [ ! -e "$BASE/.complete" ]; then
  say "debootstrap trixie (cached in $BASE)"
  rm -rf "$BASE"
  mkdir -p "$CACHE"
  debootstrap --variant=minbase --include="$PACKAGES" \
    trixie "$BASE" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1
  touch "$BASE/.complete"
fi

say "preparing this run's root"
rm -rf "$WORK"
cp -a "$BASE" "$WORK"
echo "appendonly yes" >>"$WORK/etc/valkey/valkey.conf"
echo "127.0.0.1 virtufin-api" >>"$WORK/etc/hosts"
grpcurl_bin=$(python3 - <<'PY'
import os, sysconfig, glob
cands = glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "grpcurl*", "**", "grpcurl"), recursive=True)
print(next((c for c in cands if os.path.isfile(c) and os.access(c, os.X_OK)), ""))
PY
)
[ -n "$grpcurl_bin" ] || grpcurl_bin=$(command -v grpcurl)
cp "$grpcurl_bin" "$WORK/usr/local/bin/grpcurl"
cp "$TARGET"/release/virtufin-ws-echo "$WORK/usr/local/bin/"
cp "$TARGET"/release/virtufin-callprobe "$WORK/usr/local/bin/"
cat >"$WORK/etc/systemd/system/ws-echo.service" <<'UNIT'
[Unit]
Description=WebSocket echo peer for the chain test
[Service]
ExecStart=/usr/local/bin/virtufin-ws-echo 127.0.0.1:9100
[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/ws-echo.service "$WORK/etc/systemd/system/multi-user.target.wants/ws-echo.service"
cp "$DEB" "$WORK/var/cache/virtufin.deb"
systemd-nspawn -q -D "$WORK" --register=no --keep-unit --private-network dpkg -i /var/cache/virtufin.deb >"$CACHE/dpkg.log" 2>&1 ||
  { cat "$CACHE/dpkg.log"; exit 1; }
pass "the .deb installs (units enabled: $(ls "$WORK/etc/systemd/system/multi-user.target.wants" | grep -c virtufin))"

NSPAWN=""
boot() {
  systemd-nspawn -q -D "$WORK" --register=no --keep-unit --private-network -b >"$CACHE/console.log" 2>&1 &
  NSPAWN=$!
  # The container's PID 1 is nspawn's child running systemd; nspawn's
  # short-lived helper child must not be taken for it (that flaked once:
  # every later nsenter hit a gone PID).
  LEADER=""
  for _ in $(seq 100); do
    for p in $(pgrep -P "$NSPAWN"); do
      [ "$(cat "/proc/$p/comm" 2>/dev/null)" = systemd ] && { LEADER=$p; break 2; }
    done
    sleep 0.1
  done
  in_ct systemctl is-system-running --wait >/dev/null || true
}
in_ct() { nsenter -t "$LEADER" -a "$@"; }
prop() { in_ct systemctl show -P "$2" "$1"; }
wait_active() { for _ in $(seq 300); do [ "$(in_ct systemctl is-active "$1")" = active ] && return 0; sleep 0.1; done; return 1; }
cleanup() { [ -n "$NSPAWN" ] && kill "$NSPAWN" 2>/dev/null || true; }
trap cleanup EXIT
# Waits until the api lists a subscription by that subscriber (the signal
# that a publish will be seen).
subscribed_as() {
  in_ct python3 -c 'import json, sys, urllib.request
s = json.load(urllib.request.urlopen("http://127.0.0.1:5001/v1/pubsub/subscriptions"))
sys.exit(0 if any(x["subscriber"] == sys.argv[1] for x in s["subscriptions"]) else 1)' "$1" 2>/dev/null
}
wait_subscribed() { for _ in $(seq 100); do subscribed_as "$1" && return 0; sleep 0.1; done; return 1; }

say "boot"
boot
for u in $UNITS; do check "$u is active after boot" wait_active "$u"; done

api_ready=$(prop virtufin-api ActiveEnterTimestampMonotonic)
for u in virtufin-websocketmanager virtufin-workmanager; do
  started=$(prop $u ExecMainStartTimestampMonotonic)
  check "$u started ($started µs) after the api was ready ($api_ready µs)" test "$started" -ge "$api_ready"
done

say "the api waits for Valkey"
in_ct systemctl kill -s SIGSTOP valkey-server
in_ct systemctl restart --no-block virtufin-api
ok=1
for _ in $(seq 30); do [ "$(in_ct systemctl is-active virtufin-api)" = active ] && ok=0; sleep 0.1; done
check "the api is not active while Valkey does not answer (status: $(prop virtufin-api StatusText))" test "$ok" = 1
in_ct systemctl kill -s SIGCONT valkey-server
check "the api becomes active once Valkey answers" wait_active virtufin-api
check "the websocketmanager is active again" wait_active virtufin-websocketmanager
check "the workmanager is active again" wait_active virtufin-workmanager

say "the seed's smoke check, inside the container"
in_ct grpcurl -plaintext virtufin-api:5002 virtufin.api.v1.Health/HealthCheck >/dev/null && pass "Health/HealthCheck" || fail "Health/HealthCheck"
in_ct sh -c 'grpcurl -plaintext -d '"'"'{"topic":"websocketmanager.connectionstatus","subscriber":"test","group":"smoke"}'"'"' virtufin-api:5002 virtufin.api.v1.Pubsub/Subscribe >/tmp/sub.out 2>&1 & echo $! >/tmp/sub.pid'
wait_subscribed test
in_ct grpcurl -plaintext -d '{"topic":"websocketmanager.connectionstatus","data":"{\"connection_id\":\"smoke\",\"url\":\"ws://localhost\"}","metadata":{"ce-type":"com.virtufin.websocketmanager.connection.connected","ce-source":"urn:test","ce-id":"smoke-1"}}' virtufin-api:5002 virtufin.api.v1.Pubsub/PublishEvent >/dev/null &&
  pass "Pubsub/PublishEvent" || fail "Pubsub/PublishEvent"
in_ct grpcurl -plaintext -d '{"topic":"websocketmanager.connectionstatus","subscriber":"test","group":"smoke"}' virtufin-api:5002 virtufin.api.v1.Pubsub/Unsubscribe >/dev/null &&
  pass "Pubsub/Unsubscribe" || fail "Pubsub/Unsubscribe"
for _ in $(seq 50); do in_ct sh -c 'kill -0 $(cat /tmp/sub.pid) 2>/dev/null' || break; sleep 0.1; done
check "Subscribe received smoke-1 and ended" in_ct grep -q '"id": "smoke-1"' /tmp/sub.out
listed=$(in_ct grpcurl -plaintext virtufin-api:5002 virtufin.api.v1.Gateway/ListServices 2>&1 || true)
gw_both() { grep -q '"websocketmanager"' <<<"$listed" && grep -q '"workmanager"' <<<"$listed"; }
check "the packaged services file gives the Gateway both downstream services" gw_both

say "kill -9 of the api"
in_ct virtufin state set chain acknowledged "before-kill" >/dev/null
wsm_pid=$(prop virtufin-websocketmanager MainPID)
wm_pid=$(prop virtufin-workmanager MainPID)
in_ct systemctl kill -s KILL virtufin-api
for _ in $(seq 100); do [ "$(prop virtufin-api NRestarts)" -ge 1 ] && break; sleep 0.1; done
check "systemd restarted the api (NRestarts=$(prop virtufin-api NRestarts))" wait_active virtufin-api
ready_again() {
  for _ in $(seq 300); do
    [ "$(prop virtufin-websocketmanager StatusText)" = "virtufin-websocketmanager ready" ] &&
      in_ct virtufin ws list >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}
check "the websocketmanager re-handshook and is ready" ready_again
check "... without being restarted (PID $wsm_pid)" test "$(prop virtufin-websocketmanager MainPID)" = "$wsm_pid"
wm_ready_again() {
  for _ in $(seq 300); do
    [ "$(prop virtufin-workmanager StatusText)" = "virtufin-workmanager ready" ] &&
      in_ct virtufin workers list >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}
check "the workmanager re-handshook and is ready" wm_ready_again
check "... without being restarted (PID $wm_pid)" test "$(prop virtufin-workmanager MainPID)" = "$wm_pid"
check "acknowledged state survived" test "$(in_ct virtufin state get chain acknowledged | grep -o before-kill)" = before-kill

say "reboot"
conn=$(in_ct virtufin ws connect ws://127.0.0.1:9100/ --auto-reconnect | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
check "a websocketmanager connection is open ($conn)" test -n "$conn"
in_ct virtufin state set chain across-reboot "kept" >/dev/null
printf 'def Process(event):\n    return {"type": "chain-answers", "data": event["data"]}\n' >"$WORK/root/echo.py"
worker=$(in_ct virtufin workers create /root/echo.py --topic chain-jobs --start | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
check "a Python worker is running ($worker)" test -n "$worker"
in_ct systemctl reboot 2>/dev/null || true
wait "$NSPAWN" || true
boot
for u in $UNITS; do check "$u is active after the reboot" wait_active "$u"; done
check "state written before the reboot is there" test "$(in_ct virtufin state get chain across-reboot | grep -o kept)" = kept
conn_back() {
  in_ct virtufin ws list | grep "\"id\":\"$conn\"" | grep -q '"status":"connected"' &&
    [ "$(in_ct virtufin ws send "$conn" still-there)" = still-there ]
}
check "the websocketmanager's connection came back (a correlated send answers)" conn_back
worker_back() { in_ct virtufin workers list | grep "\"id\":\"$worker\"" | grep -q '"status":"running"'; }
check "the workmanager's worker came back" worker_back
in_ct sh -c 'virtufin subscribe chain-answers --subscriber chain-answers --count 1 >/tmp/answer.out 2>&1 & echo $! >/tmp/answer.pid'
wait_subscribed chain-answers
in_ct virtufin publish chain-jobs after-reboot >/dev/null
for _ in $(seq 100); do in_ct sh -c 'kill -0 $(cat /tmp/answer.pid) 2>/dev/null' || break; sleep 0.1; done
check "... and answers events" in_ct grep -q after-reboot /tmp/answer.out

say "a native worker (C ABI v1, in virtufin-worker-host) under the units' sandbox"
cp "$TARGET"/release/libvirtufin_echo_worker.so "$WORK/root/"
native=$(in_ct virtufin workers create /root/libvirtufin_echo_worker.so --topic chain-native-jobs --start | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
check "a native worker is running ($native)" test -n "$native"
in_ct sh -c 'virtufin subscribe com.virtufin.example.echo.reply --subscriber chain-native --count 2 >/tmp/native.out 2>&1 & echo $! >/tmp/native.pid'
wait_subscribed chain-native
in_ct virtufin publish chain-native-jobs '{"command":"echo","payload":"native-under-systemd"}' >/dev/null
in_ct virtufin publish chain-native-jobs '{"command":"gateway","service":"websocketmanager","method":"List","request":{}}' >/dev/null
for _ in $(seq 100); do in_ct sh -c 'kill -0 $(cat /tmp/native.pid) 2>/dev/null' || break; sleep 0.1; done
native_answered() { in_ct grep -q native-under-systemd /tmp/native.out; }
check "... and answers an event" native_answered
native_answered || in_ct sh -c 'echo "   subscriber output:"; cat /tmp/native.out; echo "   lifecycle events:"; timeout 3 virtufin subscribe workmanager.workerstatus --subscriber chain-diag | grep error' || true
check "... and its gateway_call reaches the websocketmanager through the api's Gateway" in_ct grep -q "$conn" /tmp/native.out

say "API keys as systemd credentials, and the Gateway"
# Keys and bindings for the api; each downstream service gets its own key
# as a credential (its DynamicUser cannot read root's files itself).
in_ct sh -c 'umask 077; mkdir -p /etc/virtufin/keys
cat >/etc/virtufin/api-keys.yaml <<EOF
keys:
  - {name: admin, key: chain-admin-key-0123456789}
  - {name: websocketmanager, key: chain-wsm-key-0123456789, services: [websocketmanager]}
  - {name: workmanager, key: chain-wm-key-0123456789ab, services: [workmanager]}
EOF
echo chain-wsm-key-0123456789 >/etc/virtufin/keys/websocketmanager
echo chain-wm-key-0123456789ab >/etc/virtufin/keys/workmanager
umask 022
cat >/etc/virtufin/services.json <<EOF
{"services": [
  {"name": "websocketmanager", "grpc": {"host": "127.0.0.1", "port": 5202, "reflectionEnabled": true}},
  {"name": "workmanager", "grpc": {"host": "127.0.0.1", "port": 5102, "reflectionEnabled": true}}
]}
EOF
d=/etc/systemd/system
mkdir -p $d/virtufin-api.service.d $d/virtufin-websocketmanager.service.d $d/virtufin-workmanager.service.d
printf "[Service]\nLoadCredential=api-keys:/etc/virtufin/api-keys.yaml\nEnvironment=SERVICES_CONFIG_PATH=/etc/virtufin/services.json\n" >$d/virtufin-api.service.d/keys.conf
printf "[Service]\nLoadCredential=api-key:/etc/virtufin/keys/websocketmanager\n" >$d/virtufin-websocketmanager.service.d/key.conf
printf "[Service]\nLoadCredential=api-key:/etc/virtufin/keys/workmanager\n" >$d/virtufin-workmanager.service.d/key.conf
systemctl daemon-reload'
in_ct systemctl restart virtufin-api
in_ct systemctl restart virtufin-websocketmanager virtufin-workmanager
check "the api is active with keys required" wait_active virtufin-api
check "the websocketmanager is ready with its own key" wait_active virtufin-websocketmanager
check "the workmanager is ready with its own key" wait_active virtufin-workmanager
no_key=$(in_ct grpcurl -plaintext -d '{"topic":"t","data":"x"}' virtufin-api:5002 virtufin.api.v1.Pubsub/PublishEvent 2>&1 || true)
check "grpcurl without a key: Unauthenticated" grep -q Unauthenticated <<<"$no_key"
methods=$(in_ct grpcurl -plaintext -H 'x-api-key: chain-admin-key-0123456789' -d '{"service":"workmanager"}' virtufin-api:5002 virtufin.api.v1.Gateway/ListMethods 2>&1 || true)
check "grpcurl with a key: the Gateway lists the workmanager's methods by reflection" grep -q CreateWorker <<<"$methods"
listed=$(in_ct virtufin --api-key chain-admin-key-0123456789 gateway invoke websocketmanager List 2>&1 || true)
check "the CLI calls the websocketmanager's List through the Gateway" grep -q connections <<<"$listed"
denied=$(in_ct virtufin --api-key chain-wsm-key-0123456789 state get workmanager anything 2>&1 || true)
check "the websocketmanager's key cannot read the workmanager's state" grep -q PermissionDenied <<<"$denied"
audit=$(in_ct journalctl -u virtufin-api -o verbose --no-pager 2>/dev/null | grep -c 'F_CALLER=websocketmanager' || true)
check "audit lines in the journal name the websocketmanager as caller ($audit)" test "${audit:-0}" -gt 0

# --- reload without restart (Type=notify-reload) -------------------------
# systemd 257 copies a LoadCredential= file only when the service starts
# (a reload does not refresh it), so keys that change live come from
# VIRTUFIN_API_KEYS_FILE: here a file in the api's own state directory, owned by its
# DynamicUser and readable by nobody else.
reload_keys_file=/var/lib/private/virtufin/api/api-keys.yaml
reload_write_keys() { # $1: extra YAML lines under keys:
  in_ct sh -c "umask 077; { cat /etc/virtufin/api-keys.yaml; printf '%s' \"$1\"; } >$reload_keys_file.new &&
    chown \$(stat -c %u /var/lib/private/virtufin/api) $reload_keys_file.new && mv $reload_keys_file.new $reload_keys_file"
}
reload_checks() {
  say "reload without restart (Type=notify-reload)"
  check "virtufin-api is Type=notify-reload" test "$(prop virtufin-api Type)" = notify-reload
  reload_write_keys ""
  in_ct sh -c 'printf "[Service]\nEnvironment=VIRTUFIN_API_KEYS_FILE=/var/lib/virtufin/api/api-keys.yaml\n" >/etc/systemd/system/virtufin-api.service.d/reload.conf; systemctl daemon-reload'
  in_ct systemctl restart virtufin-api
  check "the api is active with its keys from VIRTUFIN_API_KEYS_FILE" wait_active virtufin-api
  local pid new_key=chain-reload-key-0123456789
  pid=$(prop virtufin-api MainPID)
  refused_before=$(in_ct virtufin --api-key $new_key state get chain acknowledged 2>&1 || true)
  check "a key not yet configured is refused (Unauthenticated)" grep -q Unauthenticated <<<"$refused_before"
  reload_write_keys "  - {name: reloaded, key: $new_key}
"
  check "systemctl reload virtufin-api succeeds" in_ct systemctl reload virtufin-api
  echo "   STATUS after the reload: $(prop virtufin-api StatusText)"
  check "the new key works after the reload" test "$(in_ct virtufin --api-key $new_key state get chain acknowledged | grep -o before-kill)" = before-kill
  check "... without a restart (PID $pid)" test "$(prop virtufin-api MainPID)" = "$pid"
  in_ct sh -c "printf 'keys: [this is not: valid\n' >$reload_keys_file"
  check "systemctl reload with a broken keys file still completes" in_ct systemctl reload virtufin-api
  local status
  status=$(prop virtufin-api StatusText)
  echo "   STATUS after the broken reload: $status"
  check "STATUS= says the keys file was refused" grep -q "reload refused.*API keys" <<<"$status"
  check "the journal says why" sh -c "nsenter -t $LEADER -a journalctl -u virtufin-api --no-pager -n 50 | grep -q 'reload refused'"
  check "the old keys keep working (admin)" test "$(in_ct virtufin --api-key chain-admin-key-0123456789 state get chain acknowledged | grep -o before-kill)" = before-kill
  check "the old keys keep working (the one added by the reload)" test "$(in_ct virtufin --api-key $new_key state get chain acknowledged | grep -o before-kill)" = before-kill
  check "the api stayed up (PID $pid, active)" test "$(prop virtufin-api MainPID)/$(in_ct systemctl is-active virtufin-api)" = "$pid/active"
  for u in virtufin-websocketmanager virtufin-workmanager; do
    local p
    p=$(prop $u MainPID)
    check "systemctl reload $u (log filter) keeps PID $p" sh -c "nsenter -t $LEADER -a systemctl reload $u && test \"\$(nsenter -t $LEADER -a systemctl show -P MainPID $u)\" = $p"
  done
  # Back to a good file for what follows.
  reload_write_keys "  - {name: reloaded, key: $new_key}
"
  in_ct systemctl reload virtufin-api
}

# --- socket activation: zero refused calls across restarts ----------------
sockets_probe_start() {
  in_ct rm -f /tmp/probe.ready /tmp/probe.json
  in_ct sh -c 'virtufin-callprobe --api-key chain-admin-key-0123456789 --service chain --key acknowledged --ready-file /tmp/probe.ready >/tmp/probe.json 2>/tmp/probe.err & echo $! >/tmp/probe.pid'
  for _ in $(seq 200); do in_ct test -e /tmp/probe.ready && return 0; sleep 0.1; done
  echo "   the probe did not get its first answers:"; in_ct cat /tmp/probe.err || true
  return 1
}
sockets_probe_stop() {
  in_ct sh -c 'kill -TERM $(cat /tmp/probe.pid)'
  for _ in $(seq 700); do in_ct sh -c 'kill -0 $(cat /tmp/probe.pid) 2>/dev/null' || break; sleep 0.1; done
  in_ct cat /tmp/probe.json
}
# $1: what was done; $2: broken connections allowed per loop (kill -9 only);
# stdin: the probe's JSON.
sockets_report() {
  python3 -c '
import json, sys
what, allowed = sys.argv[1], int(sys.argv[2])
text = sys.stdin.read().strip()
try:
    r = json.loads(text.splitlines()[-1])
except Exception:
    print("FAIL  %s: no probe result (%r)" % (what, text[:300])); sys.exit(1)
ok = True
for loop in ("grpc HealthCheck", "grpc GetState", "http GET /health"):
    c = r.get(loop)
    if c is None:
        print("FAIL  %s: %s made no call" % (what, loop)); ok = False; continue
    # A gRPC round runs both calls on one connection: one broken
    # connection can fail both.
    print("   %-17s %-16s answered %5d %s, refused %d, broken %d, timeouts %d, slowest %d ms%s" % (
        what, loop, c["answered"], json.dumps(c["by_status"]), c["refused"], c["transport"], c["timeout"],
        c["slowest_ms"], ("  e.g. " + c["examples"][0]) if c["examples"] else ""))
    if c["refused"] or c["timeout"] or c["transport"] > allowed or c["answered"] == 0:
        ok = False
sys.exit(0 if ok else 1)
' "$1" "$2"
}
sockets_phase() { # $1: label; $2: broken connections allowed per loop; $3...: the disruption
  local label=$1 allowed=$2
  shift 2
  if ! sockets_probe_start; then fail "$label: the probe started"; return; fi
  local before
  before=$(prop virtufin-api MainPID)
  "$@"
  local new=""
  for _ in $(seq 300); do
    new=$(prop virtufin-api MainPID)
    [ "$new" != "$before" ] && [ "$new" != 0 ] && [ "$(in_ct systemctl is-active virtufin-api)" = active ] && break
    sleep 0.1
  done
  check "$label: the api runs again as a new process ($before -> $new)" test "$new" != "$before" -a "$new" != 0
  local out
  out=$(sockets_probe_stop)
  check "$label: 0 refused, 0 timeouts, every call answered (broken connections allowed per loop: $allowed)" sockets_report "$label" "$allowed" <<<"$out"
}
sockets_kill9() { in_ct systemctl kill -s KILL virtufin-api; }
sockets_restart() { in_ct systemctl restart virtufin-api; }
sockets_reinstall() { in_ct dpkg -i /var/cache/virtufin.deb >"$WORK/var/log/virtufin-reinstall.log" 2>&1 || { cat "$WORK/var/log/virtufin-reinstall.log"; return 1; }; }
sockets_checks() {
  say "socket activation: zero refused calls across restarts"
  for s in api websocketmanager workmanager; do
    for k in http grpc; do
      check "virtufin-$s-$k.socket is active (FileDescriptorName=$(prop virtufin-$s-$k.socket FileDescriptorName))" \
        test "$(in_ct systemctl is-active virtufin-$s-$k.socket)" = active
    done
    check "virtufin-$s took its listeners from systemd" sh -c "nsenter -t $LEADER -a journalctl -u virtufin-$s --no-pager -b | grep -q socket-activated"
  done
  sockets_phase "restart" 0 sockets_restart
  sockets_phase "kill -9" 1 sockets_kill9
  # An upgrade shortly after a few restarts: the admin's restarts use up
  # the api's start limit (StartLimitBurst=5 in 120 s; reset-failed first
  # so that exactly 5 starts are in the window), the upgrade's restart is
  # the 6th. The postinst must not let it hit the limit: a service that
  # hits it fails and systemd closes its sockets (refused connections).
  in_ct systemctl reset-failed virtufin-api
  for _ in 1 2 3 4 5; do in_ct systemctl restart virtufin-api; done
  local sockets_grpc_since
  sockets_grpc_since=$(prop virtufin-api-grpc.socket ActiveEnterTimestampMonotonic)
  sockets_phase "reinstall" 0 sockets_reinstall
  check "the reinstall's maintainer scripts ran without errors" sh -c "! grep -q 'Could not execute systemctl' '$WORK/var/log/virtufin-reinstall.log'"
  check "after the reinstall the socket units stayed up (not restarted)" \
    test "$(prop virtufin-api-grpc.socket ActiveEnterTimestampMonotonic)" = "$sockets_grpc_since"
  for u in $UNITS; do check "$u is active after the reinstall" wait_active "$u"; done
}

reload_checks
sockets_checks

say "security exposure (systemd-analyze security)"
for u in $UNITS; do
  score=$(in_ct systemd-analyze security "$u.service" --no-pager | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')
  echo "   $u: $score"
  check "$u exposure $score <= 2.0" awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 2.0) }'
done

say "start-to-ready time and idle RSS"
in_ct systemctl stop virtufin-workmanager virtufin-websocketmanager virtufin-api
t0=$(python3 -c 'import time; print(int(time.monotonic() * 1e6))')
in_ct systemctl start virtufin-api virtufin-websocketmanager virtufin-workmanager
t1=0
for u in $UNITS; do
  t=$(prop "$u" ActiveEnterTimestampMonotonic)
  [ "$t" -gt "$t1" ] && t1=$t
done
echo "   systemctl start → all three ready: $(( (t1 - t0) / 1000 )) ms (target ≤ 1000 ms; the workmanager recovers its running worker first)"
sleep 2
for u in $UNITS; do
  pid=$(prop "$u" MainPID)
  echo "   $u idle RSS: $(in_ct awk '/VmRSS/ {printf "%.1f MiB", $2/1024}' "/proc/$pid/status") (target ≤ 20 MiB)"
done

if [ "$failures" -gt 0 ]; then
  for u in $UNITS; do
    say "journal of $u (last 40 lines), for the failures above"
    in_ct journalctl -u "$u" --no-pager -n 40 -o short-monotonic || true
  done
fi
in_ct systemctl poweroff || true
wait "$NSPAWN" || true
NSPAWN=""
echo "chain: $passes passed, $failures failed"
if [ "$failures" -gt 0 ]; then
  echo "(container console: $CACHE/console.log)"
  exit 1
fi
