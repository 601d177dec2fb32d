# The evaluation's core: NixOS configurations evaluated by nixpkgs' own
# lib.evalModules with the real NixOS files (systemd.nix, the redis/valkey
# module, assertions, meta; utils and the systemd unit functions through
# them), the stand-ins of standins.nix and the stand-in pkgs of pkgs.nix;
# and this repository's flake.nix called with stand-in inputs (nix 2.8 has
# no flakes).
{
  # A nixpkgs tree: nixpkgs-sparse, or a full checkout (a path, or a string
  # holding an absolute one).
  nixpkgs,
  # This repository.
  repo ? ../../..,
  system ? "x86_64-linux",
  # What pkgs.testers.runNixOSTest returns (see flake.nix's checks).
  runNixOSTest ? null,
}: let
  root =
    if builtins.isString nixpkgs
    then /. + nixpkgs
    else nixpkgs;
  lib = import (root + "/lib");

  pkgsFor = system: overlays:
    import ./pkgs.nix ({
        inherit lib repo system overlays;
        nixpkgs = root;
      }
      // lib.optionalAttrs (runNixOSTest != null) {inherit runNixOSTest;});

  # flake.nix's outputs, as `nix flake` would call them: `self` is the
  # outputs themselves plus the source's outPath, `nixpkgs` gives `lib`
  # and `legacyPackages.<system>` (here the stand-in pkgs).
  flake = let
    outputs = (import (repo + "/flake.nix")).outputs {
      self =
        outputs
        // {
          # A string, not a path: interpolating it must not copy the
          # repository into the store.
          outPath = toString repo;
          _type = "flake";
        };
      nixpkgs = {
        inherit lib;
        outPath = toString root;
        legacyPackages = lib.genAttrs ["x86_64-linux" "aarch64-linux"] (s: pkgsFor s []);
      };
    };
  in
    outputs;

  # The module argument `pkgs`: the stand-ins plus the flake's overlay, so
  # that nixos-modules/ used without the flake finds pkgs.virtufin.
  pkgs = pkgsFor system [flake.overlays.default];

  standins = import ./standins.nix {
    inherit lib;
    nixpkgs = root;
  };

  nixosModules = map (f: root + "/nixos/modules/${f}") [
    "system/boot/systemd.nix"
    "services/databases/redis.nix"
    "misc/assertions.nix"
    "misc/meta.nix"
  ];

  # As nixos/modules/misc/extra-arguments.nix and eval-config.nix do.
  args = {config, ...}: {
    _module.args = {
      inherit pkgs;
      utils = import (root + "/nixos/lib/utils.nix") {inherit lib config pkgs;};
    };
  };

  # One NixOS configuration from a list of modules.
  evalSystem = modules:
    lib.evalModules {
      modules = nixosModules ++ standins.modules ++ [args] ++ modules;
      specialArgs.modulesPath = root + "/nixos/modules";
    };
in {
  inherit lib pkgs flake evalSystem;
  inherit (standins) sources;
}
