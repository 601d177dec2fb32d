# Sourced by checks/nixos/eval/run.sh and checks/nixos/container/run.sh:
# finds the nixpkgs tree and sets up nix-instantiate for checks/nixos/eval.
#
# The nixpkgs tree, first found: the argument, $NIXPKGS (a full checkout:
# there the real firewall and id modules replace their stand-ins), or
# ../shared/nixpkgs-sparse beside the repository (where CI has it).
# find_nixpkgs prints it, or nothing when there is none; it exits 1 on a
# tree that is not nixpkgs.
find_nixpkgs() {
  local nixpkgs=${1:-${NIXPKGS:-}}
  if [ -z "$nixpkgs" ] && [ -d ../shared/nixpkgs-sparse ]; then
    nixpkgs=../shared/nixpkgs-sparse
  fi
  [ -n "$nixpkgs" ] || return 0
  nixpkgs=$(cd "$nixpkgs" && pwd)
  if [ ! -f "$nixpkgs/lib/default.nix" ] || [ ! -f "$nixpkgs/nixos/modules/system/boot/systemd.nix" ]; then
    echo "$nixpkgs is not a nixpkgs tree (no lib/default.nix or nixos/modules/system/boot/systemd.nix)" >&2
    exit 1
  fi
  echo "$nixpkgs"
}

# Text rendered for reading back is written to the store
# (builtins.toFile): the system store when it is writable, else a store
# of our own under the cache directory (nix maps its paths).
# Sets nix_args and args; evaluate runs nix-instantiate with them.
eval_setup() {
  nix_args=(--eval --strict --read-write-mode --option build-users-group "")
  args=(--argstr nixpkgs "$1")
  if ! { [ -w /nix/store ] || { [ ! -e /nix/store ] && [ "$(id -u)" = 0 ]; } || [ -n "${NIX_REMOTE:-}" ]; }; then
    local root="${XDG_CACHE_HOME:-$HOME/.cache}/virtufin-nix-eval"
    nix_args+=(--store "$root")
    args+=(--argstr storeRoot "$root")
  fi
}
evaluate() { nix-instantiate "${nix_args[@]}" "${args[@]}" "$@"; }
