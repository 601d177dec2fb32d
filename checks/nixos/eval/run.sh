#!/usr/bin/env bash
# The NixOS evaluation check: evaluates nixos-modules/ and flake.nix with
# nixpkgs' own module system and NixOS's own systemd files (default.nix),
# then prints one line per configuration and exits 1 on any failure.
# Nothing is built and no VM runs.
#
# The nixpkgs tree, first found: the argument, $NIXPKGS (a full checkout:
# there the real firewall and id modules replace their stand-ins), or
# ../shared/nixpkgs-sparse beside the repository (where CI has it).
# Without one it prints a SKIP line and exits 0.
set -euo pipefail
cd "$(dirname "$0")/../../.."

nixpkgs=${1:-${NIXPKGS:-}}
if [ -z "$nixpkgs" ] && [ -d ../shared/nixpkgs-sparse ]; then
  nixpkgs=../shared/nixpkgs-sparse
fi
if [ -z "$nixpkgs" ]; then
  echo "######## SKIP: NixOS evaluation (checks/nixos/eval) NOT RUN: no nixpkgs tree" \
    "(set NIXPKGS=/path/to/nixpkgs, or provide ../shared/nixpkgs-sparse) ########"
  exit 0
fi
nixpkgs=$(cd "$nixpkgs" && pwd)
if [ ! -f "$nixpkgs/lib/default.nix" ] || [ ! -f "$nixpkgs/nixos/modules/system/boot/systemd.nix" ]; then
  echo "check-nix: $nixpkgs is not a nixpkgs tree (no lib/default.nix or nixos/modules/system/boot/systemd.nix)" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Secret files for the cases, each holding a canary that must appear in no
# rendered unit and no store file.
canary="virtufin-eval-canary-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
mkdir "$work/secrets"
for f in valkey-password valkey-sentinel-password api.env websocketmanager.env api-keys.yaml api-key dapr-secrets.json; do
  printf '%s-%s\n' "$canary" "$f" >"$work/secrets/$f"
done

# Text rendered for reading back is written to the store
# (builtins.toFile): the system store when it is writable, else a store
# of our own under the cache directory (nix maps its paths).
nix_args=(--eval --strict --read-write-mode --option build-users-group "")
args=(--argstr nixpkgs "$nixpkgs" --argstr secrets "$work/secrets" --argstr canary "$canary")
if ! { [ -w /nix/store ] || { [ ! -e /nix/store ] && [ "$(id -u)" = 0 ]; } || [ -n "${NIX_REMOTE:-}" ]; }; then
  root="${XDG_CACHE_HOME:-$HOME/.cache}/virtufin-nix-eval"
  nix_args+=(--store "$root")
  args+=(--argstr storeRoot "$root")
fi
evaluate() { nix-instantiate "${nix_args[@]}" "${args[@]}" "$@"; }

echo "== NixOS evaluation (checks/nixos/eval) with $nixpkgs"
start=$(date +%s.%N)
if ! evaluate --json -A report checks/nixos/eval >"$work/report.json" 2>"$work/stderr"; then
  # One configuration broke the whole evaluation: find it, and show its error.
  cat "$work/stderr" >&2
  echo "-- the evaluation failed as a whole; evaluating each configuration alone:" >&2
  evaluate --json -A caseNames checks/nixos/eval 2>/dev/null | python3 -c 'import json,sys; print("\n".join(json.load(sys.stdin)))' |
    while read -r name; do
      if out=$(evaluate --json -E "{...}@args: (import ./checks/nixos/eval args).failuresOf \"$name\"" 2>&1 >/dev/null); then :; else
        echo "FAIL $name:" >&2
        echo "$out" >&2
      fi
    done
  if ! out=$(evaluate --json -A report.flake checks/nixos/eval 2>&1 >/dev/null); then
    echo "FAIL flake.nix outputs:" >&2
    echo "$out" >&2
  fi
  if ! out=$(evaluate --json -A report.debian checks/nixos/eval 2>&1 >/dev/null); then
    echo "FAIL the Debian package's virtufin-daprd.service (checks/nixos/eval/debian.nix):" >&2
    echo "$out" >&2
  fi
  exit 1
fi
elapsed=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)")

python3 - "$work/report.json" "$elapsed" <<'PY' || status=$?
import ast, json, sys
report = json.load(open(sys.argv[1]))
failed = 0
for case in report["cases"]:
    if case["failures"]:
        failed += 1
        print(f"FAIL {case['name']}")
        for f in case["failures"]:
            print("     " + f.replace("\n", "\n     "))
    else:
        print(f"ok   {case['name']}")
flake = list(report["flake"]["failures"])
for backend, script in report["flake"]["testScripts"].items():
    try:
        ast.parse(script)
    except SyntaxError as e:
        flake.append(f"flake.nix: checks.*.nixos-chain-{backend}: testScript is not Python: {e}")
if flake:
    failed += 1
    print("FAIL flake.nix outputs")
    for f in flake:
        print("     " + f.replace("\n", "\n     "))
else:
    print("ok   flake.nix outputs (packages, overlays, nixosModules, checks incl. the nixos-chain tests' node and testScript, devShells, formatter)")
if report["debian"]:
    failed += 1
    print("FAIL the Debian package's virtufin-daprd.service against the module's (stack/dapr)")
    for f in report["debian"]:
        print("     " + f.replace("\n", "\n     "))
else:
    print("ok   the Debian package's virtufin-daprd.service, its components and the api's drop-in are shaped as the module's (stack/dapr)")
print("     NixOS files: real nixpkgs systemd.nix, redis.nix, assertions.nix, meta.nix, utils.nix, systemd-lib; "
      + "; ".join(report["sources"]))
n = len(report["cases"]) + 2
print(f"== NixOS evaluation: {n - failed} of {n} passed in {sys.argv[2]} s (evaluated only: nothing built, no VM run)")
sys.exit(1 if failed else 0)
PY
exit "${status:-0}"
