# The NixOS evaluation check (run by run.sh, from scripts/check-nix).
#
#   nix-instantiate --eval --strict --json checks/nixos/eval \
#     --arg nixpkgs /path/to/nixpkgs --argstr secrets DIR --argstr canary TEXT \
#     -A report
#
# `configurations.<name>` is the rendered host of each case (render.nix):
# unit texts, drop-ins, store files, daprd's command line and components —
# what a script would need to write a host out.
{
  nixpkgs,
  repo ? ../../..,
  # Where the secret files of the cases are (paths only are used), and the
  # text they contain, which must appear nowhere in the output.
  secrets ? "/run/secrets/virtufin-eval",
  canary ? null,
  # See render.nix (run.sh sets it when it uses a store of its own).
  storeRoot ? "",
}: let
  e = import ./eval.nix {inherit nixpkgs repo;};
  inherit (e) lib;
  render = import ./render.nix {inherit lib storeRoot;};
  check = import ./checks.nix {inherit lib canary;};
  cases = import ./cases.nix {
    inherit lib repo secrets;
    inherit (e) flake;
  };
  byName = lib.listToAttrs (map (c: lib.nameValuePair c.name c) cases);

  configurations = lib.mapAttrs (_: c: render (e.evalSystem c.modules)) byName;
  flakeChecks = import ./flake-outputs.nix {
    inherit lib nixpkgs repo;
    inherit render check;
  };

  # The Debian package's virtufin-daprd.service against the module's.
  debian = import ./debian.nix {
    inherit lib repo;
    nixos = configurations."stack/dapr";
  };

  # A case whose evaluation throws (an option of a wrong type, say) is a
  # failure of its own; run.sh evaluates it again alone to show the error.
  result = name: let
    failures = check byName.${name} configurations.${name};
    tried = builtins.tryEval (builtins.deepSeq failures failures);
  in {
    inherit name;
    evaluated = tried.success;
    failures =
      if tried.success
      then tried.value
      else ["${name}: the evaluation failed (the error follows)"];
  };
  # The flake's nixos-chain-<backend> VM test node as a host's files, with
  # its test script (checks/nixos/container runs the one on the other).
  host = import ./host.nix {inherit lib storeRoot;};
  base = e.evalSystem [];
  chainHosts = lib.mapAttrs (backend: node:
    host {
      evaluated = node;
      inherit base;
    }
    // {testScript = flakeChecks.report.testScripts.${backend};})
  flakeChecks.nodes;
in {
  inherit configurations chainHosts;
  caseNames = map (c: c.name) cases;
  # For run.sh's second look at a case that did not evaluate.
  failuresOf = name: check byName.${name} configurations.${name};
  report = {
    cases = map (c: result c.name) cases;
    flake = flakeChecks.report;
    inherit debian;
    sources =
      map (s: "${
        if s.real
        then "real"
        else "stand-in"
      } ${s.file}")
      e.sources;
  };
}
