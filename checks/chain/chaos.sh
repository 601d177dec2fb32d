# The chaos pass of the valkey pass (sourced by valkey.sh; uses run.sh's
# helpers): a steady load of state writes and events with exact accounting
# (virtufin-chaosload) while the api, the websocketmanager, the workmanager
# and Valkey are each killed with SIGKILL in turn, and a worker process is
# killed in the middle of an event. Afterwards every acknowledged write
# must be readable and every acknowledged event delivered (to an audit
# subscriber) and answered (by the worker); duplicates are counted
# (at-least-once delivery allows them), not failed.
#
# Valkey runs with `appendfsync always` here (run.sh's root): without it a
# kill -9 of Valkey loses up to a second of acknowledged writes, which is
# Valkey's documented trade-off, not ours (README, "Beyond one machine").

chaos_key=chain-admin-key-0123456789
chaos_write_ok() { in_ct virtufin --api-key "$chaos_key" state set chaos-probe probe ok >/dev/null 2>&1; }
chaos_subscribed() {
  in_ct python3 -c 'import json, sys, urllib.request
r = urllib.request.Request("http://127.0.0.1:5001/v1/pubsub/subscriptions", headers={"x-api-key": sys.argv[2]})
s = json.load(urllib.request.urlopen(r))
sys.exit(0 if any(x["topic"] == sys.argv[1] for x in s["subscriptions"]) else 1)' "$1" "$chaos_key" 2>/dev/null
}
# $1: label; $2: the unit whose NRestarts must grow (or ""); $3...: the
# check that says it recovered. Prints the time from the kill to recovery.
chaos_recovered() {
  local label=$1 unit=$2 t0=$3 before=$4
  shift 4
  local ok=1
  for _ in $(seq 600); do
    if { [ -z "$unit" ] || [ "$(prop "$unit" NRestarts)" -gt "$before" ]; } && "$@"; then ok=0; break; fi
    sleep 0.1
  done
  check "$label: recovered in $(($(now_ms) - t0)) ms" test "$ok" = 0
}
chaos_kill_unit() { # $1: unit; $2...: the recovery check
  local unit=$1 before t0
  shift
  before=$(prop "$unit" NRestarts)
  t0=$(now_ms)
  in_ct systemctl kill -s KILL "$unit"
  chaos_recovered "kill -9 $unit" "$unit" "$t0" "$before" "$@"
}
chaos_conn_back() { in_ct virtufin ws list | grep "\"id\":\"$conn\"" | grep -q '"status":"connected"'; }
chaos_worker_running() { in_ct virtufin workers list | grep "\"id\":\"$cworker\"" | grep -q '"status":"running"'; }
chaos_marker() { in_ct sh -c 'ls /tmp/systemd-private-*-virtufin-workmanager.service-*/tmp/chaos-in-event 2>/dev/null || true' | head -1; }

chaos_checks() {
  say "chaos under load: kill -9 of the api, the websocketmanager, the workmanager and Valkey; a worker killed mid-event"
  # Every 100th event takes the worker a second, with a marker file in its
  # (private) /tmp meanwhile: the test kills it while the marker is there.
  cat >"$WORK/root/chaos.py" <<'PY'
import os
import time

MARK = "/tmp/chaos-in-event"


def Process(event):
    n = int(event["data"])
    if n % 100 == 0:
        with open(MARK, "w") as f:
            f.write(str(n))
        time.sleep(1)
        os.remove(MARK)
    return {"type": "chaos-answers", "data": event["data"]}
PY
  cworker=$(in_ct virtufin workers create /root/chaos.py --topic chaos-events --start | sed -n 's/.*"id":"\([^"]*\)".*/\1/p' || true)
  check "the chaos worker runs ($cworker)" test -n "$cworker"
  local sub=1
  for _ in $(seq 100); do chaos_subscribed chaos-events && { sub=0; break; }; sleep 0.1; done
  check "... and is subscribed to chaos-events" test "$sub" = 0
  in_ct rm -f /tmp/chaos.ready /tmp/chaos.json
  in_ct sh -c "virtufin-chaosload --api-key $chaos_key --pause 40ms --ready-file /tmp/chaos.ready >/tmp/chaos.json 2>/tmp/chaos.err & echo \$! >/tmp/chaos.pid"
  local ready=1
  for _ in $(seq 300); do in_ct test -e /tmp/chaos.ready && { ready=0; break; }; sleep 0.1; done
  check "the load runs (a write and an event acknowledged, audit streams open)" test "$ready" = 0
  if [ "$ready" != 0 ]; then in_ct cat /tmp/chaos.err || true; return; fi
  sleep 3 # load before the first fault

  chaos_kill_unit virtufin-api chaos_write_ok
  sleep 3
  chaos_kill_unit virtufin-websocketmanager chaos_conn_back
  sleep 3
  chaos_kill_unit virtufin-workmanager chaos_worker_running
  sleep 3
  local api_pid
  api_pid=$(prop virtufin-api MainPID)
  chaos_kill_unit valkey-server chaos_write_ok
  # The api only Wants= Valkey: Valkey's restart must not restart it.
  check "the api was not restarted with Valkey (PID $api_pid)" test "$(prop virtufin-api MainPID)" = "$api_pid"
  sleep 3

  # The worker process, in the middle of a (slow) event.
  local marked="" t0 killed
  for _ in $(seq 300); do marked=$(chaos_marker); [ -n "$marked" ] && break; sleep 0.05; done
  if [ -z "$marked" ]; then
    fail "a worker in the middle of an event to kill (no marker within 15 s)"
  else
    local n
    n=$(in_ct cat "$marked" 2>/dev/null || true)
    t0=$(now_ms)
    # (No procps in the minimal root: /proc by hand.)
    killed=$(in_ct python3 -c 'import os, signal, sys
hit = []
for p in filter(str.isdigit, os.listdir("/proc")):
    try:
        cmd = open("/proc/%s/cmdline" % p, "rb").read().decode(errors="replace")
    except OSError:
        continue
    if int(p) != os.getpid() and sys.argv[1] in cmd and "bootstrap.py" in cmd:
        os.kill(int(p), signal.SIGKILL)
        hit.append(p)
print("pid " + " ".join(hit) if hit else "")' "$cworker" || true)
    check "killed the worker process in the middle of event $n ($killed)" test -n "$killed"
    chaos_recovered "the worker after kill -9" "" "$t0" 0 chaos_worker_running
  fi
  sleep 3

  in_ct sh -c 'kill -TERM $(cat /tmp/chaos.pid)'
  local done_=1
  for _ in $(seq 1800); do in_ct sh -c 'kill -0 $(cat /tmp/chaos.pid) 2>/dev/null' || { done_=0; break; }; sleep 0.1; done
  check "the load settled and reported" test "$done_" = 0
  local report
  report=$(in_ct cat /tmp/chaos.json || true)
  check "acknowledged = readable / delivered / answered: 0 lost (duplicates counted)" \
    python3 checks/chain/chaos_report.py "$report"
}
