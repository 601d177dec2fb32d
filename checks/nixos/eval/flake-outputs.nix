# flake.nix's outputs (called with stand-in inputs by eval.nix): every
# attribute the README's "NixOS" section lists exists with the right shape,
# and checks.nixos-chain-* hand pkgs.testers.runNixOSTest a well-formed
# test, whose node is then evaluated and checked like the cases.
{
  lib,
  nixpkgs,
  repo,
  render,
  check,
}: let
  # runNixOSTest's stand-in: the test is evaluated against the options
  # nixpkgs' nixos/lib/testing/{name,nodes,testScript}.nix declare for it,
  # with their types, so a misspelt or mistyped attribute is an error.
  runNixOSTest = test: let
    evaluated = lib.evalModules {
      modules = [
        {
          options = {
            name = lib.mkOption {type = lib.types.str;};
            nodes = lib.mkOption {
              type = lib.types.lazyAttrsOf lib.types.deferredModule;
              default = {};
            };
            defaults = lib.mkOption {
              type = lib.types.deferredModule;
              default = {};
            };
            testScript = lib.mkOption {type = lib.types.either lib.types.str (lib.types.functionTo lib.types.str);};
          };
        }
        test
      ];
    };
  in {
    type = "derivation";
    name = "vm-test-run-${evaluated.config.name}";
    outPath = "${builtins.storeDir}/00000000000000000000000000000000-vm-test-run";
    test = evaluated.config;
  };

  e = import ./eval.nix {inherit nixpkgs repo runNixOSTest;};
  outputs = e.flake;
  systems = ["aarch64-linux" "x86_64-linux"];
  isDrv = lib.isDerivation;

  failures = what: expected: found:
    lib.optional (expected != found) "flake.nix: ${what}: expected ${builtins.toJSON expected}, found ${builtins.toJSON found}";
  names = attrs: builtins.attrNames attrs;

  perSystem = system: let
    pkgs = outputs.packages.${system} or {};
    checks = outputs.checks.${system} or {};
    virtufin = pkgs.virtufin or null;
    units = virtufin.systemdUnits or {};
  in
    failures "packages.${system}" ["daprd" "default" "virtufin"] (names pkgs)
    ++ failures "packages.${system}: all derivations" true (lib.all isDrv (builtins.attrValues pkgs))
    ++ failures "packages.${system}.default is the virtufin package" (virtufin.name or null) (pkgs.default.name or null)
    ++ failures "packages.${system}.virtufin: the systemd units it installs into lib/systemd/system"
    (lib.sort lib.lessThan (lib.concatMap (s: ["virtufin-${s}.service" "virtufin-${s}-http.socket" "virtufin-${s}-grpc.socket"]) ["api" "websocketmanager" "workmanager"]))
    (names units)
    ++ lib.concatLists (lib.mapAttrsToList (n: text:
      failures "packages.${system}.virtufin: ${n}'s ExecStart= is rewritten from /usr/bin to the package" true
      (lib.hasInfix "ExecStart=${virtufin}/bin/${lib.removeSuffix ".service" n}\n" text && !(lib.hasInfix "/usr/bin/" text)))
    (lib.filterAttrs (n: _: lib.hasSuffix ".service" n) units))
    ++ failures "checks.${system}" ["clippy" "nix-format" "nixos-chain-dapr" "nixos-chain-valkey" "rustfmt" "test" "virtufin"] (names checks)
    ++ failures "checks.${system}: all derivations" true (lib.all isDrv (builtins.attrValues checks))
    ++ failures "checks.${system}.test runs the test suite with valkey, grpcurl and Python's websockets"
    {
      doCheck = true;
      inputs = ["grpcurl" "python3-with-packages" "valkey"];
    } {
      doCheck = checks.test.doCheck or null;
      inputs = lib.sort lib.lessThan (map (p: p.name) (checks.test.nativeCheckInputs or []));
    }
    ++ failures "devShells.${system}" ["default"] (names (outputs.devShells.${system} or {}))
    ++ failures "formatter.${system} is alejandra" "alejandra" (outputs.formatter.${system}.name or null);

  # The VM tests: their test, and their node as a NixOS configuration.
  chain = backend: let
    test = outputs.checks.x86_64-linux."nixos-chain-${backend}".test;
    node = e.evalSystem [test.defaults test.nodes.machine];
    case = {
      name = "flake.nix: checks.x86_64-linux.nixos-chain-${backend}, node machine";
      inherit backend;
    };
  in {
    inherit (test) testScript;
    inherit node;
    failures =
      failures "nixos-chain-${backend}: test name" "virtufin-chain-${backend}" test.name
      ++ failures "nixos-chain-${backend}: nodes" ["machine"] (names test.nodes)
      ++ failures "nixos-chain-${backend}: testScript sets BACKEND first" true (builtins.isString test.testScript && lib.hasPrefix "BACKEND = \"${backend}\"\n" test.testScript)
      ++ check case (render node)
      ++ failures "nixos-chain-${backend}: the node's /etc/hosts entry for the smoke check" "127.0.0.1 virtufin-api" node.config.networking.extraHosts
      ++ failures "nixos-chain-${backend}: the node's Python worker file" true (node.config.environment.etc ? "virtufin-test/echo.py");
  };
  chains = lib.genAttrs ["valkey" "dapr"] chain;
in {
  # The VM tests' nodes, evaluated (checks/nixos/eval/host.nix writes them out).
  nodes = lib.mapAttrs (_: c: c.node) chains;
  report = {
    failures =
      failures "outputs" ["checks" "devShells" "formatter" "nixosModules" "overlays" "packages"] (names outputs)
      ++ failures "nixosModules" ["api" "default" "websocketmanager" "workmanager"] (names outputs.nixosModules)
      ++ failures "overlays" ["default"] (names outputs.overlays)
      ++ failures "overlays.default adds virtufin and daprd to pkgs" ["daprd" "virtufin"]
      (names (lib.filterAttrs (_: isDrv) (outputs.overlays.default e.pkgs e.pkgs)))
      ++ failures "packages/checks/devShells/formatter systems" [systems systems systems systems]
      (map (o: names outputs.${o}) ["packages" "checks" "devShells" "formatter"])
      ++ lib.concatMap perSystem systems
      ++ lib.concatMap (c: c.failures) (builtins.attrValues chains);
    # For run.sh, which checks that they are Python.
    testScripts = lib.mapAttrs (_: c: c.testScript) chains;
  };
}
