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
# and prints start-to-ready time and idle RSS. Then the dapr pass, on a
# fresh copy of the same root with daprd (scripts/daprd: packaging/daprd)
# in /usr/local/bin and the api switched over as the README says:
#   - virtufin-daprd.service (the packaged one, shaped as the NixOS
#     module's: checks/nixos/eval compares them) renders the components
#     and is active only once /v1.0/healthz answers; the api, which
#     Requires=/After= it, started after that, and stays `activating`
#     while daprd does not answer;
#   - the seed's grpcurl smoke check;
#   - kill -9 of daprd: the api is not ready (STATUS=, /health 503) and
#     ready again once systemd has restarted daprd, without a restart of
#     its own;
#   - the websocketmanager and workmanager on this backend, and a reboot
#     keeping state, a connection and a worker that answers (as above);
#   - virtufin-daprd's `systemd-analyze security` exposure is at most 2.0.
# Without Go (no daprd) the dapr pass is a loud SKIP. Needs root.
set -euo pipefail
cd "$(dirname "$0")/../.."

CACHE=${VIRTUFIN_CHAIN_CACHE:-/var/tmp/virtufin-chain}
PACKAGES=systemd,systemd-sysv,dbus,valkey-server,ca-certificates,python3
# The cached root is keyed by its package list.
BASE=$CACHE/base-trixie-$(echo "$PACKAGES" | md5sum | cut -c1-8)
WORK=$CACHE/run
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
DEB=$(ls -t target/debian/virtufin_*.deb | head -1)
pass "cargo deb -p virtufin built $(basename "$DEB")"

# daprd for the dapr pass: built once per machine from packaging/daprd.
daprd_status=0
DAPRD=$(scripts/daprd) || daprd_status=$?
case $daprd_status in
  0) pass "daprd $("$DAPRD" --version) from packaging/daprd ($(ldd "$DAPRD" >/dev/null 2>&1 && echo dynamically linked || echo static))" ;;
  3) DAPRD="" ;;
  *) fail "scripts/daprd failed (exit $daprd_status): no daprd for the dapr pass"; DAPRD="" ;;
esac

if [ ! -e "$BASE/.complete" ]; then
  say "debootstrap trixie (cached in $BASE)"
  rm -rf "$BASE"
  mkdir -p "$CACHE"
  debootstrap --variant=minbase --include="$PACKAGES" \
    trixie "$BASE" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1
  touch "$BASE/.complete"
fi

# A fresh copy of the cached root with the .deb installed; the arguments,
# if any, are a shell script run in it after dpkg (the dapr pass's setup).
prepare_root() {
  say "preparing this run's root"
  rm -rf "$WORK"
  cp -a "$BASE" "$WORK"
  echo "appendonly yes" >>"$WORK/etc/valkey/valkey.conf"
  echo "127.0.0.1 virtufin-api" >>"$WORK/etc/hosts"
  cp "$grpcurl_bin" "$WORK/usr/local/bin/grpcurl"
  cp target/release/virtufin-ws-echo "$WORK/usr/local/bin/"
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
  systemd-nspawn -q -D "$WORK" --register=no --keep-unit --private-network \
    sh -c "dpkg -i /var/cache/virtufin.deb && ${1:-true}" >"$CACHE/dpkg.log" 2>&1 ||
    { cat "$CACHE/dpkg.log"; exit 1; }
  pass "the .deb installs (units enabled: $(ls "$WORK/etc/systemd/system/multi-user.target.wants" | grep -c virtufin))"
}
grpcurl_bin=$(python3 - <<'PY'
import os, sysconfig, glob
cands = glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "grpcurl*", "**", "grpcurl"), recursive=True)
print(next((c for c in cands if os.path.isfile(c) and os.access(c, os.X_OK)), ""))
PY
)
[ -n "$grpcurl_bin" ] || grpcurl_bin=$(command -v grpcurl)
prepare_root

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

poweroff_ct() {
  in_ct systemctl poweroff || true
  wait "$NSPAWN" || true
  NSPAWN=""
}
# The unit is ready again (its own STATUS=) and the CLI's call answers.
ready_again() {
  local unit=$1; shift
  for _ in $(seq 300); do
    [ "$(prop "$unit" StatusText)" = "$unit ready" ] && in_ct "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}
# Each downstream unit started only after the api was ready.
check_started_after_api() {
  local api_ready started
  api_ready=$(prop virtufin-api ActiveEnterTimestampMonotonic)
  for u in virtufin-websocketmanager virtufin-workmanager; do
    started=$(prop $u ExecMainStartTimestampMonotonic)
    check "$u started ($started µs) after the api was ready ($api_ready µs)" test "$started" -ge "$api_ready"
  done
}
# Restarts the api while $1 (its store) is stopped with SIGSTOP: the api
# must stay `activating`, saying what it waits for ($waiting_status), until
# $1 answers.
check_api_waits_for() {
  local store=$1 ok=1
  in_ct systemctl kill -s SIGSTOP "$store"
  in_ct systemctl restart --no-block virtufin-api
  for _ in $(seq 30); do [ "$(in_ct systemctl is-active virtufin-api)" = active ] && ok=0; sleep 0.1; done
  waiting_status=$(prop virtufin-api StatusText)
  check "the api is not active while $store does not answer ($(in_ct systemctl is-active virtufin-api), status: $waiting_status)" test "$ok" = 1
  in_ct systemctl kill -s SIGCONT "$store"
  check "the api becomes active once $store answers" wait_active virtufin-api
  check "the websocketmanager is active again" wait_active virtufin-websocketmanager
  check "the workmanager is active again" wait_active virtufin-workmanager
}
# The seed's grpcurl smoke check, inside the container.
smoke() {
  say "the seed's smoke check, inside the container"
  in_ct grpcurl -plaintext virtufin-api:5002 virtufin.api.v1.Health/HealthCheck >/dev/null && pass "Health/HealthCheck" || fail "Health/HealthCheck"
  in_ct sh -c 'rm -f /tmp/sub.out; grpcurl -plaintext -d '"'"'{"topic":"websocketmanager.connectionstatus","subscriber":"test","group":"smoke"}'"'"' virtufin-api:5002 virtufin.api.v1.Pubsub/Subscribe >/tmp/sub.out 2>&1 & echo $! >/tmp/sub.pid'
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
}
# A websocketmanager connection, state and a Python worker, then a reboot:
# all three are back (sets $conn and $worker).
reboot_keeps_state() {
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
  for u in "$@" $UNITS; do check "$u is active after the reboot" wait_active "$u"; done
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
}
security() {
  say "security exposure (systemd-analyze security)"
  local score
  for u in "$@"; do
    score=$(in_ct systemd-analyze security "$u.service" --no-pager | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')
    echo "   $u: $score"
    check "$u exposure $score <= 2.0" awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 2.0) }'
  done
}
idle_rss() {
  local pid
  for u in "$@"; do
    pid=$(prop "$u" MainPID)
    echo "   $u idle RSS: $(in_ct awk '/VmRSS/ {printf "%.1f MiB", $2/1024}' "/proc/$pid/status") (target ≤ 20 MiB)"
  done
}
journals() {
  [ "$failures" -gt 0 ] || return 0
  for u in "$@"; do
    say "journal of $u (last 40 lines), for the failures above"
    in_ct journalctl -u "$u" --no-pager -n 40 -o short-monotonic || true
  done
}

say "boot"
boot
for u in $UNITS; do check "$u is active after boot" wait_active "$u"; done
check_started_after_api

say "the api waits for Valkey"
check_api_waits_for valkey-server

smoke

say "kill -9 of the api"
in_ct virtufin state set chain acknowledged "before-kill" >/dev/null
wsm_pid=$(prop virtufin-websocketmanager MainPID)
wm_pid=$(prop virtufin-workmanager MainPID)
in_ct systemctl kill -s KILL virtufin-api
for _ in $(seq 100); do [ "$(prop virtufin-api NRestarts)" -ge 1 ] && break; sleep 0.1; done
check "systemd restarted the api (NRestarts=$(prop virtufin-api NRestarts))" wait_active virtufin-api
check "the websocketmanager re-handshook and is ready" ready_again virtufin-websocketmanager virtufin ws list
check "... without being restarted (PID $wsm_pid)" test "$(prop virtufin-websocketmanager MainPID)" = "$wsm_pid"
check "the workmanager re-handshook and is ready" ready_again virtufin-workmanager virtufin workers list
check "... without being restarted (PID $wm_pid)" test "$(prop virtufin-workmanager MainPID)" = "$wm_pid"
check "acknowledged state survived" test "$(in_ct virtufin state get chain acknowledged | grep -o before-kill)" = before-kill

reboot_keeps_state
say "a native worker (C ABI v1, in virtufin-worker-host) under the units' sandbox"
cp target/release/libvirtufin_echo_worker.so "$WORK/root/"
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

security $UNITS

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
idle_rss $UNITS
journals $UNITS
poweroff_ct

if [ -z "$DAPRD" ]; then
  echo "######## SKIP: the dapr pass NOT RUN: no Go to build daprd from packaging/daprd (scripts/daprd) ########"
else
  say "the dapr pass: a fresh root, daprd in /usr/local/bin, the api switched over as the README says"
  # The README's steps (no daemon-reload or start: nothing runs yet).
  prepare_root 'mkdir -p /etc/systemd/system/virtufin-api.service.d &&
    cp /usr/share/virtufin/dapr/virtufin-api.conf /etc/systemd/system/virtufin-api.service.d/20-dapr.conf &&
    systemctl enable virtufin-daprd'
  install -m 755 "$DAPRD" "$WORK/usr/local/bin/daprd"

  say "boot (dapr)"
  boot
  for u in virtufin-daprd $UNITS; do check "$u is active after boot" wait_active "$u"; done
  check "the api Requires= virtufin-daprd ($(prop virtufin-api Requires))" grep -qw virtufin-daprd.service <<<"$(prop virtufin-api Requires)"
  check "the api is After= virtufin-daprd" grep -qw virtufin-daprd.service <<<"$(prop virtufin-api After)"
  check "virtufin-daprd Requires= the store ($(prop virtufin-daprd Requires))" grep -qw valkey-server.service <<<"$(prop virtufin-daprd Requires)"
  health=$(in_ct python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:5001/health").read().decode())' 2>&1 || true)
  check "the api's /health reports the Dapr sidecar at 127.0.0.1:50001 / 3500" grep -q 'the Dapr sidecar at 127.0.0.1:50001 (gRPC) / 3500 (HTTP) answers' <<<"$health"
  # daprd's unit is active only once ExecStartPost saw /v1.0/healthz answer.
  daprd_healthy=$(prop virtufin-daprd ActiveEnterTimestampMonotonic)
  api_started=$(prop virtufin-api ExecMainStartTimestampMonotonic)
  check "the api started ($api_started µs) after daprd was healthy ($daprd_healthy µs)" test "$api_started" -ge "$daprd_healthy"
  check_started_after_api
  # The components ExecStartPre rendered from /usr/share/virtufin/dapr/resources
  # are the source files with the unit's values in the placeholders, and
  # daprd loaded them.
  components_rendered() {
    in_ct python3 - <<'PY'
import glob, json, os, sys
env = {"@VALKEY_HOST@": "127.0.0.1:6379", "@PROCESSING_TIMEOUT@": "60s", "@REDELIVER_INTERVAL@": "15s",
       "@SECRETS_FILE@": "/run/credentials/virtufin-daprd.service/secrets.json"}
ok = True
for src in sorted(glob.glob("/usr/share/virtufin/dapr/resources/*.json")):
    text = open(src).read()
    for k, v in env.items():
        text = text.replace(k, v)
    out = "/run/virtufin-daprd/resources/" + os.path.basename(src)[:-5] + ".yaml"
    if not os.path.exists(out) or json.load(open(out)) != json.loads(text):
        print("   not as rendered:", out); ok = False
sys.exit(0 if ok else 1)
PY
  }
  check "virtufin-daprd's ExecStartPre rendered packaging/dapr/resources with the unit's values" components_rendered
  components=$(in_ct python3 -c 'import json, urllib.request
m = json.load(urllib.request.urlopen("http://127.0.0.1:3500/v1.0/metadata"))
print(" ".join(sorted(c["name"] + ":" + c["type"] for c in m.get("components", []))))' 2>&1 || true)
  check "daprd loaded the components ($components)" test "$components" = "pubsub:pubsub.redis statestore:state.redis virtufin-secrets:secretstores.local.file"

  say "the api waits for daprd"
  check_api_waits_for virtufin-daprd
  check "... its STATUS= named the Dapr sidecar" grep -q "^waiting for .*the Dapr sidecar at 127.0.0.1:50001" <<<"$waiting_status"

  smoke

  say "kill -9 of daprd"
  in_ct virtufin state set chain acknowledged "before-daprd-kill" >/dev/null
  api_pid=$(prop virtufin-api MainPID)
  api_restarts=$(prop virtufin-api NRestarts)
  wsm_pid=$(prop virtufin-websocketmanager MainPID)
  wm_pid=$(prop virtufin-workmanager MainPID)
  in_ct systemctl kill -s KILL virtufin-daprd
  # Watch the api until it has been seen not ready (its STATUS= and
  # /health) and ready again.
  seen=$(in_ct python3 - <<'PY'
import json, subprocess, time, urllib.error, urllib.request
def status():
    return subprocess.run(["systemctl", "show", "-P", "StatusText", "virtufin-api"], capture_output=True, text=True).stdout.strip()
def health():
    try:
        return urllib.request.urlopen("http://127.0.0.1:5001/health", timeout=2).status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0
not_ready_status = None; saw_503 = False
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    s, h = status(), health()
    if s != "virtufin-api ready" and not_ready_status is None:
        not_ready_status = s
    saw_503 |= h == 503
    if not_ready_status is not None and saw_503 and s == "virtufin-api ready" and h == 200:
        break
    time.sleep(0.05)
print(json.dumps({"status": not_ready_status, "saw_503": saw_503, "back": s == "virtufin-api ready" and h == 200}))
PY
)
  echo "   $seen"
  check "systemd restarted daprd (NRestarts=$(prop virtufin-daprd NRestarts))" test "$(prop virtufin-daprd NRestarts)" -ge 1
  check "the api was not ready while daprd was gone (STATUS= said why)" grep -q '"status": "waiting for' <<<"$seen"
  check "... and /health answered 503" grep -q '"saw_503": true' <<<"$seen"
  check "the api is ready again (STATUS=, /health 200)" grep -q '"back": true' <<<"$seen"
  check "... without a restart of its own (PID $api_pid, NRestarts $api_restarts)" test "$(prop virtufin-api MainPID):$(prop virtufin-api NRestarts)" = "$api_pid:$api_restarts"
  check "the websocketmanager is ready" ready_again virtufin-websocketmanager virtufin ws list
  check "... without being restarted (PID $wsm_pid)" test "$(prop virtufin-websocketmanager MainPID)" = "$wsm_pid"
  check "the workmanager is ready" ready_again virtufin-workmanager virtufin workers list
  check "... without being restarted (PID $wm_pid)" test "$(prop virtufin-workmanager MainPID)" = "$wm_pid"
  check "acknowledged state survived" test "$(in_ct virtufin state get chain acknowledged | grep -o before-daprd-kill)" = before-daprd-kill

  reboot_keeps_state virtufin-daprd
  security virtufin-daprd
  idle_rss virtufin-daprd
  journals virtufin-daprd $UNITS
  poweroff_ct
fi

echo "chain: $passes passed, $failures failed"
if [ "$failures" -gt 0 ]; then
  echo "(container console: $CACHE/console.log)"
  exit 1
fi
