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
