#!/usr/bin/env bash
# The NixOS evaluation check: evaluates nixos-modules/ and flake.nix with
# nixpkgs' own module system and NixOS's own systemd files (default.nix),
# then prints one line per configuration and exits 1 on any failure.
# Nothing is built and no VM runs.
#
# The nixpkgs tree: see lib.sh. Without one it prints a SKIP line and
# exits 0.
set -euo pipefail
cd "$(dirname "$0")/../../.."
. checks/nixos/eval/lib.sh

nixpkgs=$(find_nixpkgs "${1:-}")
if [ -z "$nixpkgs" ]; then
  echo "######## SKIP: NixOS evaluation (checks/nixos/eval) NOT RUN: no nixpkgs tree" \
    "(set NIXPKGS=/path/to/nixpkgs, or provide ../shared/nixpkgs-sparse) ########"
  exit 0
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

eval_setup "$nixpkgs"
args+=(--argstr secrets "$work/secrets" --argstr canary "$canary")

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
