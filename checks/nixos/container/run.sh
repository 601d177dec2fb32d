#!/usr/bin/env bash
# The NixOS VM test, checks/nixos/chain.py, run for real under systemd in a
# container instead of a VM (no NixOS VM can be built here):
#
#   1. the flake's checks.x86_64-linux.nixos-chain-<backend> is evaluated
#      with nixpkgs' module system (checks/nixos/eval, host.nix): its
#      node's unit files and drop-ins, /etc files, users and every store
#      path they name, and its testScript, exactly as runNixOSTest gets it;
#   2. host.py writes that host into a copy of the chain test's cached
#      Debian root (checks/chain/container.sh), the nixpkgs packages
#      mapped onto Debian's (its PACKAGES table; anything unmapped fails by
#      name), ours from this checkout's release build and scripts/daprd;
#   3. driver.py, a shim of the NixOS test driver's `machine` API over
#      systemd-nspawn + nsenter, runs the testScript unchanged.
#
#   checks/nixos/container/run.sh [valkey] [dapr]     (default: both)
#
# Needs root, a nixpkgs tree (checks/nixos/eval/lib.sh; a loud SKIP
# without one) and, for dapr, Go (scripts/daprd; a loud SKIP without it).
set -euo pipefail
cd "$(dirname "$0")/../../.."
. checks/chain/container.sh
. checks/nixos/eval/lib.sh

backends=("$@")
[ ${#backends[@]} -gt 0 ] || backends=(valkey dapr)

nixpkgs=$(find_nixpkgs)
if [ -z "$nixpkgs" ]; then
  echo "######## SKIP: the NixOS chain test in a container (checks/nixos/container) NOT RUN: no nixpkgs tree" \
    "(set NIXPKGS=/path/to/nixpkgs, or provide ../shared/nixpkgs-sparse) ########"
  exit 0
fi
eval_setup "$nixpkgs"
command -v nix-instantiate >/dev/null || { echo "nix-instantiate missing: run scripts/check-nix first (it installs nix-bin)" >&2; exit 1; }

ensure_base
build_release
grpcurl=$(stock_grpcurl)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$CACHE/nixos-run
failed=()
for backend in "${backends[@]}"; do
  daprd=()
  if [ "$backend" = dapr ]; then
    status=0
    path=$(scripts/daprd) || status=$?
    if [ "$status" = 3 ]; then
      echo "######## SKIP: the NixOS chain test, backend dapr, NOT RUN: no Go to build daprd (scripts/daprd) ########"
      continue
    fi
    [ "$status" = 0 ] || { failed+=("$backend (scripts/daprd failed)"); continue; }
    daprd=(--daprd "$path")
  fi
  echo "== NixOS chain test, backend $backend: evaluating checks.x86_64-linux.nixos-chain-$backend"
  SECONDS=0
  evaluate --json -A "chainHosts.$backend" checks/nixos/eval >"$work/host-$backend.json"
  python3 -c 'import json, sys; sys.stdout.write(json.load(open(sys.argv[1]))["testScript"])' \
    "$work/host-$backend.json" >"$work/test-$backend.py"
  # The script is chain.py itself, after the one line runNixOSTest's
  # testScript puts first.
  if ! diff -q <(tail -n +2 "$work/test-$backend.py") checks/nixos/chain.py >/dev/null; then
    echo "the evaluated testScript is not BACKEND + checks/nixos/chain.py" >&2
    exit 1
  fi
  echo "== writing the host into a copy of $BASE"
  rm -rf "$root"
  cp -a "$BASE" "$root"
  python3 checks/nixos/container/host.py "$work/host-$backend.json" "$root" \
    --release target/release --grpcurl "$grpcurl" "${daprd[@]}"
  echo "== running its testScript (checks/nixos/chain.py, BACKEND = \"$backend\") with checks/nixos/container/driver.py"
  if python3 checks/nixos/container/driver.py "$root" "$CACHE/nixos-console.log" "$work/test-$backend.py"; then
    echo "PASS  NixOS chain test, backend $backend, in ${SECONDS} s"
  else
    echo "FAIL  NixOS chain test, backend $backend (console: $CACHE/nixos-console.log)"
    failed+=("$backend")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "NixOS chain test failed: ${failed[*]}"
  exit 1
fi
