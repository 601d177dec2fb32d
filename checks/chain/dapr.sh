# The dapr pass of checks/chain/run.sh (sourced by it, which defines the
# helpers and variables used here): a fresh copy of the same root with
# daprd in /usr/local/bin and the api switched over as the README says.
say "the dapr pass: a fresh root, daprd in /usr/local/bin, the api switched over as the README says"
# The README's steps (no daemon-reload or start: nothing runs yet).
# The api probes every 500 ms instead of 2 s (its one setting changed
# here): systemd has daprd back ~1.5 s after a kill -9 (RestartSec=1s
# and ~0.5 s to healthy), which a 2 s probe misses about every other time.
prepare_root 'mkdir -p /etc/systemd/system/virtufin-api.service.d &&
  cp /usr/share/virtufin/dapr/virtufin-api.conf /etc/systemd/system/virtufin-api.service.d/20-dapr.conf &&
  printf "[Service]\nEnvironment=VIRTUFIN_PROBE_INTERVAL=500ms\n" >/etc/systemd/system/virtufin-api.service.d/30-probe.conf &&
  systemctl enable virtufin-daprd'
install -m 755 "$DAPRD" "$WORK/usr/local/bin/daprd"

say "boot (dapr)"
boot
for u in virtufin-daprd $UNITS; do check "$u is active after boot" wait_active "$u"; done
check "the api Requires= virtufin-daprd ($(prop virtufin-api Requires))" grep -qw virtufin-daprd.service <<<"$(prop virtufin-api Requires)"
check "the api is After= virtufin-daprd" grep -qw virtufin-daprd.service <<<"$(prop virtufin-api After)"
check "virtufin-daprd Wants= the store ($(prop virtufin-daprd Wants))" grep -qw valkey-server.service <<<"$(prop virtufin-daprd Wants)"
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
deadline = time.monotonic() + 30
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
