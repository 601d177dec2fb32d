#!/usr/bin/env bash
# Chain test under real systemd: a Debian trixie root (debootstrap, cached)
# with valkey-server and our .deb, booted with systemd-nspawn (systemd as
# PID 1, private network), driven with nsenter + systemctl. Proves, from
# systemd's own state and timestamps:
#   - each downstream unit started only after the api reported ready;
#   - the api does not become active while Valkey does not answer, and
#     does once it answers;
#   - the seed's grpcurl smoke check passes inside the container, and each
#     service's GET /metrics (through its socket unit) says virtufin_ready 1;
#   - a traceparent sent to the websocketmanager shows up as TRACE_ID= in
#     its journal and in the api's (the audit of the write it caused);
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
#   - socket activation (sockets_* in valkey.sh): the six socket units are active
#     and the services took their listeners; a continuous client
#     (virtufin-callprobe: gRPC HealthCheck + GetState and HTTP /health, a
#     fresh connection per round) through `systemctl restart virtufin-api`,
#     `kill -9` of the api and a reinstall of the .deb sees 0 refused
#     connections, 0 timeouts, every call answered (a gRPC or HTTP status);
#     broken connections only for the call in flight in the process killed
#     by kill -9 (at most one per loop), none on four restarts or reinstall;
#   - reload without restart (reload_* in valkey.sh): `systemctl reload` after a key
#     is added makes it work with the same PID; a broken keys file is
#     refused (STATUS= and the journal say so) and the old keys keep working;
#   - chaos under load (chaos.sh): state writes and events with exact
#     accounting (virtufin-chaosload) while the api, the websocketmanager,
#     the workmanager and Valkey (appendfsync always) are each killed with
#     SIGKILL, and a Python worker is killed in the middle of an event:
#     acknowledged writes all readable, acknowledged events all delivered
#     and answered, duplicates counted, each fault's recovery time printed;
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
# Without Go (no daprd) the dapr pass is a loud SKIP. The passes are
# checks/chain/valkey.sh and dapr.sh; this file builds, prepares and
# holds the helpers both use. Needs root.
set -euo pipefail
cd "$(dirname "$0")/../.."

. checks/chain/container.sh
# A run root of its own (VIRTUFIN_CHAIN_WORK) lets two runs share the cache.
WORK=${VIRTUFIN_CHAIN_WORK:-$CACHE/run}
UNITS="virtufin-api virtufin-websocketmanager virtufin-workmanager"
failures=0
passes=0

command -v cargo-deb >/dev/null || { say "installing cargo-deb"; cargo install --locked --quiet cargo-deb; }

say "building release binaries and the .deb"
build_release
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

ensure_base

# A fresh copy of the cached root with the .deb installed; the arguments,
# if any, are a shell script run in it after dpkg (the dapr pass's setup).
prepare_root() {
  say "preparing this run's root"
  rm -rf "$WORK"
  cp -a "$BASE" "$WORK"
  echo "appendonly yes" >>"$WORK/etc/valkey/valkey.conf"
  # Acknowledged means on disk: the chaos pass kills Valkey with SIGKILL.
  echo "appendfsync always" >>"$WORK/etc/valkey/valkey.conf"
  echo "127.0.0.1 virtufin-api" >>"$WORK/etc/hosts"
  cp "$grpcurl_bin" "$WORK/usr/local/bin/grpcurl"
  cp target/release/virtufin-ws-echo "$WORK/usr/local/bin/"
  cp target/release/virtufin-callprobe "$WORK/usr/local/bin/"
  cp target/release/virtufin-chaosload "$WORK/usr/local/bin/"
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
grpcurl_bin=$(stock_grpcurl)

NSPAWN=""
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
  wait_subscribed test || fail "the api lists the smoke subscription"
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
  wait_subscribed chain-answers || fail "the api lists the subscription chain-answers"
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
  local pid target
  for u in "$@"; do
    pid=$(prop "$u" MainPID)
    # The target is for our services (daprd is Dapr's).
    target=""
    [[ " $UNITS " == *" $u "* ]] && target=" (target ≤ 20 MiB)"
    echo "   $u idle RSS: $(in_ct awk '/VmRSS/ {printf "%.1f MiB", $2/1024}' "/proc/$pid/status")$target"
  done
}
journals() {
  [ "$failures" -gt 0 ] || return 0
  for u in "$@"; do
    say "journal of $u (last 40 lines), for the failures above"
    in_ct journalctl -u "$u" --no-pager -n 40 -o short-monotonic || true
  done
}

# VIRTUFIN_CHAIN_PASSES picks the passes (default: both), e.g. "dapr"
# while working on that one.
want() { [[ " ${VIRTUFIN_CHAIN_PASSES:-valkey dapr} " == *" $1 "* ]]; }
timings=""
if want valkey; then
  SECONDS=0
  . checks/chain/valkey.sh
  timings+=" valkey pass ${SECONDS} s;"
fi
if want dapr; then
  if [ -z "$DAPRD" ]; then
    echo "######## SKIP: the dapr pass NOT RUN: no Go to build daprd from packaging/daprd (scripts/daprd) ########"
  else
    SECONDS=0
    . checks/chain/dapr.sh
    timings+=" dapr pass ${SECONDS} s;"
  fi
fi
echo "   time (from preparing the root to poweroff):${timings%;}"

echo "chain: $passes passed, $failures failed"
if [ "$failures" -gt 0 ]; then
  echo "(container console: $CACHE/console.log)"
  exit 1
fi
