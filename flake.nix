{
  description = "Virtufin services (api, websocketmanager, workmanager) native to systemd, with NixOS modules";

  # No flake.lock is committed yet: it could not be generated where this
  # flake was written (no network). The first `nix flake lock` (or any nix
  # command on the flake) writes it; commit it then.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = {
    self,
    nixpkgs,
  }: let
    inherit (nixpkgs) lib;
    systems = [
      "x86_64-linux"
      "aarch64-linux"
    ];
    forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

    # The flake's packages as the modules' package defaults, so that they
    # work without the overlay (NixOS tests make nixpkgs read-only). One
    # module with a fixed key, imported by each of nixosModules.*: NixOS
    # loads a keyed module once, however many of them a host imports (two
    # definitions of an option of type package never merge, even equal).
    packageDefaults = {
      key = "${toString ./flake.nix}#packageDefaults";
      _file = "${toString ./flake.nix}#packageDefaults";
      imports = [
        ({
          lib,
          pkgs,
          ...
        }: let
          packages = self.packages.${pkgs.stdenv.hostPlatform.system};
        in {
          services.virtufin.package = lib.mkDefault packages.virtufin;
          services.virtufin.dapr.package = lib.mkDefault packages.daprd;
        })
      ];
    };
    withPackages = module: {imports = [module packageDefaults];};
  in {
    overlays.default = final: _prev: {
      virtufin = final.callPackage ./packaging/nix/virtufin.nix {};
      daprd = final.callPackage ./packaging/nix/daprd.nix {};
    };

    packages = forAllSystems (pkgs: rec {
      virtufin = pkgs.callPackage ./packaging/nix/virtufin.nix {};
      daprd = pkgs.callPackage ./packaging/nix/daprd.nix {};
      default = virtufin;
    });

    nixosModules = {
      default = withPackages ./nixos-modules;
      api = withPackages ./nixos-modules/api.nix;
      websocketmanager = withPackages ./nixos-modules/websocketmanager.nix;
      workmanager = withPackages ./nixos-modules/workmanager.nix;
    };

    checks = forAllSystems (pkgs: let
      inherit (self.packages.${pkgs.stdenv.hostPlatform.system}) virtufin;
      chain = backend: pkgs.testers.runNixOSTest (import ./checks/nixos/chain.nix {inherit self backend;});
    in
      {
        inherit virtufin;
        # The daprd build is checked by nixos-chain-dapr (its vendorHash is
        # still to be filled in, see packaging/nix/daprd.nix).
        nixos-chain-valkey = chain "valkey";
        nixos-chain-dapr = chain "dapr";
      }
      // import ./checks/rust.nix {
        inherit pkgs virtufin;
        flakeSource = self;
      });

    devShells = forAllSystems (pkgs: {
      default = pkgs.mkShell {
        inputsFrom = [self.packages.${pkgs.stdenv.hostPlatform.system}.virtufin];
        packages = [
          pkgs.clippy
          pkgs.rustfmt
          pkgs.rust-analyzer
          pkgs.valkey
          pkgs.grpcurl
          (pkgs.python3.withPackages (ps: [ps.websockets]))
          pkgs.alejandra
        ];
      };
    });

    formatter = forAllSystems (pkgs: pkgs.alejandra);
  };
}
