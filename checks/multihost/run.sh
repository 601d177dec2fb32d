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
# accounting), a Python worker on h1's workmanager answering each event.
# Faults, in turn, each timed until h1's api confirms a write again:
#   1. kill -9 of the Valkey primary (kept down: Sentinel fails over);
#      then it is started again and must rejoin as a replica;
#   2. power-off of the host that holds the primary then (another
#      failover), and its boot again;
#   3. the primary's host cut off the bridge (its link down) for 10 s,
#      then healed (when that is h1, the load's own api: nothing may be
#      confirmed while it is cut off).
# Afterwards: every acknowledged write readable, every acknowledged event
# delivered and answered (0 lost), duplicates counted.
#
#   checks/multihost/run.sh            (root; about 2.5 min after the builds)
set -euo pipefail
cd "$(dirname "$0")/../.."
. checks/chain/container.sh

BR=vfmh0
NET=10.88.0
HOSTS=(1 2 3)
SENTINELS="$NET.11:26379,$NET.12:26379,$NET.13:26379"
failures=0
passes=0
say() { printf '== %s\n' "$*"; }
pass() { printf 'PASS  %s\n' "$*"; passes=$((passes + 1)); }
fail() { printf 'FAIL  %s\n' "$*"; failures=$((failures + 1)); }
check() { local what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }
now_ms() { python3 -c 'import time; print(int(time.monotonic() * 1000))'; }

declare -A LEADERS NSPAWNS
on() { local h=$1; shift; nsenter -t "${LEADERS[$h]}" -a "$@"; }
cleanup() {
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
api_ready() { [ "$(on "$1" systemctl show -P StatusText virtufin-api)" = "virtufin-api ready" ]; }
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
  check "h$h's api is ready on the Sentinel-managed Valkey" wait_for 300 api_ready "$h"
done

say "load: virtufin-chaosload and a Python worker on h1"
cat >"$(root_of 1)/root/chaos.py" <<'PY'
def Process(event):
    return {"type": "chaos-answers", "data": event["data"]}
PY
worker=$(on 1 virtufin workers create /root/chaos.py --topic chaos-events --start | sed -n 's/.*"id":"\([^"]*\)".*/\1/p' || true)
check "the worker runs on h1 ($worker)" test -n "$worker"
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
start_host "$victim"
check "h$victim boots again and its Valkey rejoins as a replica" wait_for 300 primary_has_replicas 2
check "h$victim's api is ready again" wait_for 300 api_ready "$victim"
sleep 3

cut=$(host_of "$(primary_seen_by 1)")
say "fault 3: h$cut, the primary's host, cut off the network for 10 s, then healed"
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
sleep $((10 - ($(now_ms) - t0) / 1000 > 0 ? 10 - ($(now_ms) - t0) / 1000 : 0))
t0=$(now_ms)
ip link set "vb-mh-$cut" up
[ "$cut" != 1 ] || recovered "heal of h1 (the old primary demoted, h1's api follows the new one)" "$t0"
check "after the heal, h$cut's Valkey is a replica again (two replicas)" wait_for 300 primary_has_replicas 2
sleep 3

say "stopping the load; accounting"
on 1 sh -c 'kill -TERM $(cat /tmp/chaos.pid)'
wait_for 1200 sh -c "nsenter -t ${LEADERS[1]} -a test -s /tmp/chaos.json" || true
report=$(on 1 cat /tmp/chaos.json || true)
echo "$report"
python3 - "$report" <<'PY' || failures=$((failures + 1))
import json, sys
try:
    r = json.loads(sys.argv[1].strip().splitlines()[-1])
except (ValueError, IndexError):
    print("FAIL  no report from virtufin-chaosload: %r" % sys.argv[1][:300]); sys.exit(1)
w, e = r["writes"], r["events"]
d, a = e["delivered"], e["answered"]
print("   writes: %d acknowledged (%d not), %d lost %s, longest gap %d ms" % (
    w["acknowledged"], w["not_acknowledged"], w["lost"], w["lost_examples"], w["longest_gap_ms"]))
print("   events: %d acknowledged (%d not), longest gap %d ms" % (
    e["acknowledged"], e["not_acknowledged"], e["longest_gap_ms"]))
print("   delivered: %d, %d lost %s, %d duplicates" % (d["delivered_unique"], d["lost"], d["lost_examples"], d["duplicates"]))
print("   answered:  %d, %d lost %s, %d duplicates" % (a["delivered_unique"], a["lost"], a["lost_examples"], a["duplicates"]))
ok = w["acknowledged"] > 0 and e["acknowledged"] > 0 and w["lost"] == 0 and d["lost"] == 0 and a["lost"] == 0
print(("PASS" if ok else "FAIL") + "  acknowledged = readable / delivered / answered: 0 lost (duplicates counted)")
sys.exit(0 if ok else 1)
PY

echo "multihost: $passes passed, $failures failed"
[ "$failures" = 0 ]
