#!/usr/bin/env bash
# Three hosts on one replicated Valkey with Sentinel, under load, through
# faults (issue 16): three systemd-booted containers (copies of the chain
# test's cached Debian root, checks/chain/container.sh) on a private bridge,
# each with the .deb's three services, a Valkey (h1 the primary, h2 and h3
# its replicas) and a Sentinel (quorum 2). Every api reaches Valkey through
# the Sentinels (redis+sentinel://) and confirms a write or an event only
# once one replica has it (VIRTUFIN_VALKEY_MIN_REPLICAS=1).
#
# Load: virtufin-chaosload on h1 (state writes and events, exact
# accounting); one Python worker run by all three workmanagers (members
# of one group, each through its own host's api: events spread over the
# hosts, none twice), naming its host in each answer's source; and two
# WebSocket connections (auto-reconnect), one opened by h2's
# websocketmanager and one by h3's, to an echo peer on the bridge
# (outside the hosts, so that no fault takes it down). The test watches
# the peer's TCP connections (ss) and the lifecycle topic.
# Faults, in turn, each timed until h1's api confirms a write again:
#   1. kill -9 of the Valkey primary (kept down: Sentinel fails over);
#      then it is started again and must rejoin as a replica;
#   2. power-off of the host that holds the primary then (another
#      failover): its WebSocket connection is reclaimed by another host
#      (timed; the `connected` event says `reclaimed_from`), and after
#      its boot again it does not take it back;
#   3. the primary's host cut off the bridge (its link down) for 25 s,
#      longer than failover plus the reclaim grace (8 s here), then healed (when that is
#      h1, the load's own api: nothing may be confirmed while it is cut
#      off); a connection reclaimed meanwhile is let go by the cut-off
#      host after the heal: the peer ends with one TCP connection per
#      connection, from its owner;
#   4. the workmanagers of h2 and h3 restarted at once: each restarts its
#      run of the worker, holding the recovery lease in turn (their
#      journals' lease intervals do not overlap).
# Afterwards: every acknowledged write readable, every acknowledged event
# delivered and answered (0 lost), duplicates counted, answers from each
# of the three hosts.
#
#   checks/multihost/run.sh            (root; about 3.5 min after the builds)
set -euo pipefail
cd "$(dirname "$0")/../.."
. checks/chain/container.sh

BR=vfmh0
NET=10.88.0
HOSTS=(1 2 3)
SENTINELS="$NET.11:26379,$NET.12:26379,$NET.13:26379"
PEER="$NET.1:9100"
# Reclaim terms of the test (defaults: heartbeat 10 s, check every 30 s,
# grace 60 s): short, so that the faults above exercise them.
RECLAIM_AFTER=8
failures=0
passes=0

declare -A LEADERS NSPAWNS
PEER_PID=""
on() { local h=$1; shift; nsenter -t "${LEADERS[$h]}" -a "$@"; }
cleanup() {
  [ -n "$PEER_PID" ] && kill "$PEER_PID" 2>/dev/null || true
  for h in "${HOSTS[@]}"; do
    [ -n "${NSPAWNS[$h]:-}" ] && kill "${NSPAWNS[$h]}" 2>/dev/null || true
  done
  sleep 1
  ip link del "$BR" 2>/dev/null || true
}
trap cleanup EXIT

command -v cargo-deb >/dev/null || { say "installing cargo-deb"; cargo install --locked --quiet cargo-deb; }
need ip iproute2
ensure_base
say "building release binaries and the .deb"
build_release
cargo deb -p virtufin --no-build --locked >/dev/null
DEB=$(ls -t target/debian/virtufin_*.deb | head -1)

ip link del "$BR" 2>/dev/null || true
ip link add "$BR" type bridge
ip link set "$BR" up
ip addr add "$NET.1/24" dev "$BR"
target/release/virtufin-ws-echo "$PEER" >/dev/null &
PEER_PID=$!

root_of() { echo "$CACHE/mh-$1"; }
prepare() {
  local h=$1 root
  root=$(root_of "$h")
  rm -rf "$root"
  cp -a "$BASE" "$root"
  echo "h$h" >"$root/etc/hostname"
  echo "127.0.0.1 virtufin-api" >>"$root/etc/hosts"
  mkdir -p "$root/etc/systemd/network"
  printf '[Match]\nName=host0\n\n[Network]\nAddress=%s.1%s/24\nLinkLocalAddressing=no\n' "$NET" "$h" \
    >"$root/etc/systemd/network/10-host0.network"
  {
    echo "bind 0.0.0.0"
    echo "protected-mode no"
    echo "appendonly yes"
    echo "appendfsync always"
    echo "replica-announce-ip $NET.1$h"
    [ "$h" = 1 ] || echo "replicaof $NET.11 6379"
  } >>"$root/etc/valkey/valkey.conf"
  # A killed Valkey stays down until the test starts it (Sentinel must fail
  # over, not systemd restart it in 100 ms).
  mkdir -p "$root/etc/systemd/system/valkey-server.service.d"
  printf '[Service]\nRestart=no\n' >"$root/etc/systemd/system/valkey-server.service.d/test.conf"
  cat >"$root/etc/valkey/sentinel-mh.conf" <<EOF
port 26379
bind 0.0.0.0
protected-mode no
sentinel announce-ip $NET.1$h
sentinel monitor virtufin $NET.11 6379 2
sentinel down-after-milliseconds virtufin 1000
sentinel failover-timeout virtufin 5000
EOF
  cat >"$root/etc/systemd/system/valkey-sentinel-mh.service" <<'UNIT'
[Unit]
Description=Valkey Sentinel of the multi-host test
After=network-online.target
[Service]
ExecStart=/usr/bin/valkey-server /etc/valkey/sentinel-mh.conf --sentinel --daemonize no
Restart=always
[Install]
WantedBy=multi-user.target
UNIT
  cp target/release/virtufin-chaosload "$root/usr/local/bin/"
  cp "$DEB" "$root/var/cache/virtufin.deb"
  systemd-nspawn -q -D "$root" --register=no --keep-unit --private-network \
    sh -c "dpkg -i /var/cache/virtufin.deb && systemctl enable systemd-networkd valkey-sentinel-mh" \
    >"$CACHE/mh-dpkg-$h.log" 2>&1 || { cat "$CACHE/mh-dpkg-$h.log"; exit 1; }
  cat >>"$root/etc/virtufin/api.env" <<EOF
VIRTUFIN_VALKEY_URL=redis+sentinel://$SENTINELS/virtufin
VIRTUFIN_VALKEY_MIN_REPLICAS=1
VIRTUFIN_VALKEY_WAIT_TIMEOUT=1s
EOF
  cat >>"$root/etc/virtufin/websocketmanager.env" <<EOF
VIRTUFIN_WS_HEARTBEAT_INTERVAL=2s
VIRTUFIN_WS_RECLAIM_INTERVAL=2s
VIRTUFIN_WS_RECLAIM_AFTER=${RECLAIM_AFTER}s
EOF
}
start_host() {
  local h=$1
  boot "$(root_of "$h")" "$CACHE/mh-console-$h.log" --network-bridge="$BR"
  LEADERS[$h]=$LEADER
  NSPAWNS[$h]=$NSPAWN
}
poweroff_host() {
  local h=$1
  on "$h" systemctl poweroff || true
  wait "${NSPAWNS[$h]}" || true
  NSPAWNS[$h]=""
}
primary_seen_by() { on "$1" valkey-cli -p 26379 sentinel get-master-addr-by-name virtufin 2>/dev/null | head -1 || true; }
host_of() { echo "${1##*.1}"; }
replicas_of() { on "$1" valkey-cli info replication 2>/dev/null | sed -n 's/^connected_slaves:\([0-9]*\).*/\1/p'; }
# Predicates for wait_for (evaluated on every try).
sentinel_names() { [ "$(primary_seen_by "$1")" = "$2" ]; }
sentinel_names_not() { local p; p=$(primary_seen_by "$1"); [ -n "$p" ] && [ "$p" != "$2" ]; }
# The primary (as h1's Sentinel names it; h1 is never taken down) has $1
# replicas connected.
primary_has_replicas() {
  local p
  p=$(primary_seen_by 1)
  [ -n "$p" ] && [ "$(replicas_of "$(host_of "$p")")" = "$1" ]
}
write_ok() { on 1 timeout 3 virtufin state set mh-probe probe ok >/dev/null 2>&1; }
wait_for() { # $1: tenths of a second; $2...: the check
  local n=$1
  shift
  for _ in $(seq "$n"); do "$@" && return 0; sleep 0.1; done
  return 1
}
unit_ready() { [ "$(on "$1" systemctl show -P StatusText "$2")" = "$2 ready" ]; }
# The peer's established TCP connections, as "host count" lines (h2 1).
peer_conns() {
  ss -Htn state established "( sport = :${PEER##*:} )" |
    awk '{ n = split($4, a, ":"); ip = a[1]; sub(/.*\.1/, "h", ip); print ip }' | sort | uniq -c |
    awk '{ print $2, $1 }'
}
# Every connection's owner (per h1's `virtufin ws list`) holds exactly
# one TCP connection to the peer, and no host holds one it does not own.
ws_consistent() {
  local owners
  owners=$(on 1 timeout 5 virtufin ws list 2>/dev/null | python3 -c '
import collections, json, sys
c = collections.Counter(json.loads(l)["instance_id"] for l in sys.stdin if l.strip())
print("\n".join("%s %d" % kv for kv in sorted(c.items())))') || return 1
  [ -n "$owners" ] && [ "$owners" = "$(peer_conns)" ]
}
# How many lifecycle events h1's watcher saw that match a Python
# condition on `d` (the event's data) and `t` (its type).
lifecycle_count() {
  on 1 cat /tmp/ws-life.jsonl 2>/dev/null | python3 -c '
import json, sys
n = 0
for line in sys.stdin:
    try:
        e = json.loads(line)
    except ValueError:
        continue
    d, t = e.get("data") or {}, e.get("type", "")
    n += bool(eval(sys.argv[1]))
print(n)' "$1"
}
lifecycle_seen() { [ "$(lifecycle_count "$1")" -ge "${2:-1}" ]; }
subscribed_as() {
  on 1 python3 -c 'import json, sys, urllib.request
s = json.load(urllib.request.urlopen("http://127.0.0.1:5001/v1/pubsub/subscriptions"))
sys.exit(0 if any(x["subscriber"] == sys.argv[1] for x in s["subscriptions"]) else 1)' "$1" 2>/dev/null
}
# The instances that run worker $1, per h1's `virtufin workers list`.
worker_instances() {
  on 1 timeout 5 virtufin workers list 2>/dev/null | python3 -c '
import json, sys
for l in sys.stdin:
    w = json.loads(l)
    if w["id"] == sys.argv[1]:
        print(" ".join(sorted(w.get("instances") or [])))' "$1"
}
runs_everywhere() { [ "$(worker_instances "$1")" = "h1 h2 h3" ]; }
# h$1's workmanager logged that it restarted one worker (its recovery)
# since $2 (journalctl --since).
recovered_one() {
  on "$1" journalctl -q -u virtufin-workmanager --since "$2" -o json 2>/dev/null |
    python3 -c '
import json, sys
sys.exit(0 if any(e.get("MESSAGE") == "workers recovered" and e.get("RECOVERED") == "1"
                  for e in map(json.loads, sys.stdin)) else 1)'
}
recovered() { # $1: label; $2: t0
  if wait_for 600 write_ok; then
    pass "$1: h1's api confirms writes again $(($(now_ms) - $2)) ms after the fault"
  else
    fail "$1: h1's api confirms no write within 60 s"
  fi
}

say "preparing three hosts"
for h in "${HOSTS[@]}"; do prepare "$h"; done
for h in "${HOSTS[@]}"; do start_host "$h"; done
pass "three hosts booted on bridge $BR ($NET.11-13)"

check "h1's Valkey is the primary with two replicas" wait_for 300 primary_has_replicas 2
for h in "${HOSTS[@]}"; do
  check "h$h's Sentinel names $NET.11 the primary" wait_for 300 sentinel_names "$h" "$NET.11"
done
for h in "${HOSTS[@]}"; do
  check "h$h's api is ready on the Sentinel-managed Valkey" wait_for 300 unit_ready "$h" virtufin-api
done

say "load: virtufin-chaosload on h1, one Python worker on all three hosts, two WebSocket connections"
cat >"$(root_of 1)/root/chaos.py" <<'PY'
import os

HOST = os.uname().nodename  # socket is on the workers' blocked list


def Process(event):
    return {"type": "chaos-answers", "data": event["data"], "source": "urn:virtufin:mh:" + HOST}
PY
worker=$(on 1 virtufin workers create /root/chaos.py --topic chaos-events --start | sed -n 's/.*"id":"\([^"]*\)".*/\1/p' || true)
check "the worker runs on h1 ($worker)" test -n "$worker"
for h in 2 3; do on "$h" virtufin workers start "$worker" >/dev/null || true; done
check "h2's and h3's workmanagers run it too" wait_for 100 runs_everywhere "$worker"
on 1 sh -c 'while :; do virtufin subscribe websocketmanager.connectionstatus --subscriber mh-watch --group mh-watch >>/tmp/ws-life.jsonl 2>>/tmp/ws-life.err; sleep 0.5; done >/dev/null 2>&1 & echo $! >/tmp/ws-life.pid'
check "h1 watches the lifecycle topic" wait_for 100 subscribed_as mh-watch
declare -A WS_IDS
for h in 2 3; do
  WS_IDS[$h]=$(on "$h" virtufin ws connect "ws://$PEER/h$h" --auto-reconnect | sed -n 's/.*"id":"\([^"]*\)".*/\1/p' || true)
  check "h$h's websocketmanager opens a connection to the peer (${WS_IDS[$h]})" test -n "${WS_IDS[$h]}"
done
check "the peer holds one TCP connection from h2 and one from h3" wait_for 100 ws_consistent
check "their connected events reach h1's watcher" wait_for 100 lifecycle_seen 't.endswith(".connected")' 2
on 1 sh -c "virtufin-chaosload --pause 40ms --settle 90s --ready-file /tmp/chaos.ready >/tmp/chaos.json 2>/tmp/chaos.err & echo \$! >/tmp/chaos.pid"
if ! wait_for 300 on 1 test -e /tmp/chaos.ready; then
  fail "the load runs"
  on 1 cat /tmp/chaos.err || true
  exit 1
fi
pass "the load runs (a write and an event confirmed by one replica, audit streams open)"
sleep 3

say "fault 1: kill -9 of the Valkey primary (h1)"
t0=$(now_ms)
on 1 systemctl kill -s SIGKILL valkey-server
check "Sentinel fails over to h2 or h3" wait_for 300 sentinel_names_not 2 "$NET.11"
recovered "failover" "$t0"
on 1 systemctl start valkey-server
new=$(primary_seen_by 2)
check "h1's Valkey rejoins as a replica of $new" wait_for 300 primary_has_replicas 2
sleep 3

victim=$(host_of "$(primary_seen_by 2)")
say "fault 2: power-off of h$victim (the primary now)"
t0=$(now_ms)
poweroff_host "$victim"
check "Sentinel fails over away from h$victim" wait_for 300 sentinel_names_not 1 "$NET.1$victim"
recovered "power-off of the primary's host" "$t0"
# Both connections open at the peer again, neither from h$victim.
reopened_elsewhere() {
  local p
  p=$(peer_conns)
  ! grep -q "^h$victim " <<<"$p" && [ "$(awk '{ s += $2 } END { print s + 0 }' <<<"$p")" = 2 ]
}
if wait_for 900 reopened_elsewhere; then
  pass "h$victim's connection reopened by another host $(($(now_ms) - t0)) ms after the power-off (peer: $(peer_conns | tr '\n' ' '))"
else
  fail "h$victim's connection not reopened by another host within 90 s of the power-off"
fi
if wait_for 600 lifecycle_seen "t.endswith('.connected') and d.get('reclaimed_from') == 'h$victim'"; then
  pass "its connected event (reclaimed_from h$victim) reached h1's watcher $(($(now_ms) - t0)) ms after the power-off"
else
  fail "no connected event with reclaimed_from h$victim within 60 s"
fi
check "the peer holds the reclaimed connection from its new owner" wait_for 100 ws_consistent
start_host "$victim"
check "h$victim boots again and its Valkey rejoins as a replica" wait_for 300 primary_has_replicas 2
check "h$victim's api is ready again" wait_for 300 unit_ready "$victim" virtufin-api
check "h$victim's websocketmanager is ready again" wait_for 300 unit_ready "$victim" virtufin-websocketmanager
# Ready means its restore is done: it restored nothing it no longer owns.
check "h$victim does not take its reclaimed connection back" ws_consistent
check "h$victim's workmanager restarted its run of the worker at boot" wait_for 300 recovered_one "$victim" "-1h"
sleep 3

cut=$(host_of "$(primary_seen_by 1)")
let_go_before=$(lifecycle_count "t.endswith('.disconnected') and 'reclaimed_by' in d")
held_by_cut=$(peer_conns | awk -v h="h$cut" '$1 == h { print $2 }')
say "fault 3: h$cut, the primary's host (holding ${held_by_cut:-0} connection(s)), cut off the network for 25 s, then healed"
t0=$(now_ms)
ip link set "vb-mh-$cut" down
if [ "$cut" != 1 ]; then
  # The two others are the Sentinels' majority: they fail over, and h1's
  # api follows while h$cut is away.
  check "Sentinel fails over away from the cut-off h$cut" wait_for 300 sentinel_names_not 1 "$NET.1$cut"
  recovered "partition of the primary's host" "$t0"
else
  # h1 (the load's api) keeps talking to its own Valkey, now a primary
  # without replicas: with MIN_REPLICAS=1 nothing it takes may be
  # confirmed (WAIT 1 times out), while h2 and h3 elect a new primary.
  sleep 3
  if write_ok; then fail "a write confirmed by the cut-off primary"; else pass "the cut-off primary confirms no write (WAIT 1 times out)"; fi
fi
sleep $((25 - ($(now_ms) - t0) / 1000 > 0 ? 25 - ($(now_ms) - t0) / 1000 : 0))
t0=$(now_ms)
ip link set "vb-mh-$cut" up
[ "$cut" != 1 ] || recovered "heal of h1 (the old primary demoted, h1's api follows the new one)" "$t0"
check "after the heal, h$cut's Valkey is a replica again (two replicas)" wait_for 300 primary_has_replicas 2
if [ "${held_by_cut:-0}" -gt 0 ]; then
  check "the connection h$cut held was reclaimed during its cut (grace ${RECLAIM_AFTER} s)" \
    wait_for 300 lifecycle_seen "t.endswith('.connected') and d.get('reclaimed_from') == 'h$cut'"
  check "after the heal h$cut lets it go (disconnected, reclaimed_by)" \
    wait_for 300 lifecycle_seen "t.endswith('.disconnected') and d.get('instance_id') == 'h$cut' and 'reclaimed_by' in d" $((let_go_before + 1))
fi
t1=$(now_ms)
if wait_for 300 ws_consistent; then
  pass "after the heal the peer holds one TCP connection per connection, from its owner ($(peer_conns | tr '\n' ' ')$(($(now_ms) - t1)) ms)"
else
  fail "after the heal the peer's connections do not match their owners: $(peer_conns | tr '\n' ' ')"
fi
sleep 3

say "fault 4: the workmanagers of h2 and h3 restarted at once"
since=$(date +%s)
on 2 systemctl restart virtufin-workmanager &
r2=$!
on 3 systemctl restart virtufin-workmanager &
r3=$!
if wait "$r2" && wait "$r3"; then pass "both restarted (ready again)"; else fail "a workmanager did not restart"; fi
lease_log() {
  on "$1" journalctl -q -u virtufin-workmanager --since "@$since" -o json 2>/dev/null |
    python3 -c '
import json, sys
for l in sys.stdin:
    e = json.loads(l)
    m = e.get("MESSAGE", "")
    if isinstance(m, str) and m.startswith("recovery lease "):
        print(e["__REALTIME_TIMESTAMP"], m.split()[2], sys.argv[1])' "h$1"
}
leases=$({ lease_log 2; lease_log 3; } | sort -n)
echo "${leases:-   (no lease lines)}" | sed 's/^/   /'
if python3 - "$leases" <<'PY'; then pass "one recovery lease holder at a time (h2 and h3 each took and released it; the intervals are disjoint)"; else fail "the recovery lease intervals"; fi
import sys
rows = [l.split() for l in sys.argv[1].splitlines() if l.strip()]
holder, took = None, []
for ts, what, host in rows:
    if what == "taken":
        if holder is not None:
            print("   %s took the lease while %s held it" % (host, holder)); sys.exit(1)
        holder = host
        took.append(host)
    elif what == "released":
        if holder != host:
            print("   %s released a lease it did not hold" % host); sys.exit(1)
        holder = None
if sorted(took) != ["h2", "h3"] or holder is not None:
    print("   expected h2 and h3 each to take and release the lease once: %s" % rows); sys.exit(1)
PY
for h in 2 3; do check "h$h's workmanager restarted its run of the worker" recovered_one "$h" "@$since"; done
sleep 3

say "stopping the load; accounting"
on 1 sh -c 'kill -TERM $(cat /tmp/chaos.pid)'
wait_for 1200 sh -c "nsenter -t ${LEADERS[1]} -a test -s /tmp/chaos.json" || true
report=$(on 1 cat /tmp/chaos.json || true)
echo "$report"
check "acknowledged = readable / delivered / answered: 0 lost (duplicates counted); answers from each host" \
  python3 checks/chain/chaos_report.py --hosts h1,h2,h3 "$report"

echo "multihost: $passes passed, $failures failed"
[ "$failures" = 0 ]
