# The valkey pass of checks/chain/run.sh (sourced by it, which defines the
# helpers and variables used here): the stack as the .deb installs it.
prepare_root

say "boot"
boot
for u in $UNITS; do check "$u is active after boot" wait_active "$u"; done
check_started_after_api

say "the api waits for Valkey"
check_api_waits_for valkey-server

smoke

say "metrics"
# The downstream services may still be re-handshaking after the api's
# restart above: ready within 30 s.
metrics_ready() {
  local m
  for _ in $(seq 300); do
    m=$(in_ct python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$1/metrics').read().decode())" 2>&1 || true)
    grep -q '^virtufin_ready 1$' <<<"$m" && grep -q '^# EOF$' <<<"$m" && return 0
    sleep 0.1
  done
  echo "   last answer: ${m:0:300}"
  return 1
}
for port in 5001 5201 5101; do
  check "GET 127.0.0.1:$port/metrics through the socket unit: OpenMetrics, virtufin_ready 1" metrics_ready "$port"
done

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
wait_subscribed chain-native || fail "the api lists the subscription chain-native"
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
audit=$(in_ct journalctl -u virtufin-api -o verbose --no-pager 2>/dev/null | grep -c '^ *CALLER=websocketmanager' || true)
check "audit lines in the journal name the websocketmanager as caller ($audit)" test "${audit:-0}" -gt 0

say "trace context: one trace id in two units' journals"
tid=4bf92f3577b34da6a3ce929d0e0e4736
traced=$(in_ct grpcurl -plaintext -H "traceparent: 00-$tid-00f067aa0ba902b7-01" -d '{"url":"ws://127.0.0.1:9100/"}' 127.0.0.1:5202 virtufin.websocketmanager.v1.WebSocketManager/Connect 2>&1 || true)
check "grpcurl Connect with a traceparent" grep -q '"id"' <<<"$traced"
trace_units() { in_ct journalctl "TRACE_ID=$tid" -o json --no-pager 2>/dev/null | python3 -c 'import sys, json; print(" ".join(sorted({json.loads(l).get("_SYSTEMD_UNIT", "?") for l in sys.stdin if l.strip()})))'; }
units=""
for _ in $(seq 50); do
  units=$(trace_units)
  case "$units" in *virtufin-api.service*virtufin-websocketmanager.service*) break ;; esac
  sleep 0.1
done
check "journalctl TRACE_ID=$tid: the websocketmanager's lines and the api's audit of its write ($units)" \
  sh -c "case '$units' in *virtufin-api.service*virtufin-websocketmanager.service*) exit 0 ;; *) exit 1 ;; esac"

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
# Four restarts under one probe (more chances for a call to race a
# shutdown); reset-failed keeps them out of the start limit.
sockets_restart() { for _ in 1 2 3 4; do in_ct systemctl reset-failed virtufin-api; in_ct systemctl restart virtufin-api || return 1; done; }
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
  # A graceful restart stops accepting at once and serves what it had
  # accepted (serve.rs LINGER): nothing may break. kill -9 cannot: the
  # kernel resets the connections the killed process held (one call in
  # flight per loop at most).
  sockets_phase "restart x4" 0 sockets_restart
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
# shellcheck source=checks/chain/chaos.sh
. "$(dirname "${BASH_SOURCE[0]}")/chaos.sh"
chaos_checks

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
