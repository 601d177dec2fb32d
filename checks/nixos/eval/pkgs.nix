# Stand-in `pkgs` for the evaluation: nothing here is ever built.
#
# - A package is a fake derivation: `type = "derivation"`, a plausible
#   store path as `outPath` (no file behind it), `meta`, `overrideAttrs`.
# - Builders that write text (writeText, writeTextFile, writeShellScript)
#   write it to the store with builtins.toFile, so the rendered text can be
#   read back from the path a unit mentions.
# - Builders that would run a script (runCommand, linkFarm, the language
#   builders) write a JSON manifest of their inputs to the store instead,
#   at their outPath: {"fake": <builder>, "name": ..., ...}. A reader that
#   meets such a path (a daprd --resources-path, say) reads what would have
#   been built from it.
#
# Attributes are added as the evaluated files need them: a missing one is
# an "attribute missing" error, never a silent default.
{
  lib,
  # The nixpkgs tree (for pkgs/pkgs-lib/formats.nix).
  nixpkgs,
  # This repository (the stand-in Rust build reads systemd/ from it).
  repo,
  system ? "x86_64-linux",
  # Applied in order, as nixpkgs' overlays (e.g. the flake's overlays.default).
  overlays ? [],
  # What pkgs.testers.runNixOSTest does with its test (the flake check
  # passes one that records and checks it).
  runNixOSTest ? null,
}: let
  inherit (builtins) toFile toJSON hashString substring replaceStrings isFunction;

  # Store names allow [A-Za-z0-9+._?=-].
  storeName = name: let
    s = lib.stringAsChars (c:
      if builtins.match "[A-Za-z0-9+._?=-]" c != null
      then c
      else "-")
    name;
  in
    if s == "" || lib.hasPrefix "." s
    then "x${s}"
    else s;

  # 32 characters from the store's base-32 alphabet (no e, o, t, u).
  fakeHash = name: replaceStrings ["e"] ["x"] (substring 0 32 (hashString "sha256" name));
  fakePath = name: "${builtins.storeDir}/${fakeHash name}-${storeName name}";

  # JSON-able inputs: functions dropped (passthru helpers and the like).
  jsonable = value:
    if isFunction value
    then null
    else if lib.isDerivation value
    then "${value}"
    else if builtins.isAttrs value
    then lib.mapAttrs (_: jsonable) (lib.filterAttrs (_: v: !isFunction v) value)
    else if builtins.isList value
    then map jsonable value
    else value;

  # A fake derivation. `outPath` defaults to a path with no file behind it.
  fake = name: attrs: let
    self =
      {
        type = "derivation";
        inherit name;
        outPath = fakePath name;
        drvPath = fakePath "${name}.drv";
        outputs = ["out"];
        outputName = "out";
        meta = {};
        passthru = {};
      }
      // attrs
      // {
        out = self;
        all = [self];
        overrideAttrs = f:
          fake name (attrs
            // (
              if isFunction f
              then f attrs
              else f
            ));
      };
  in
    self;

  # A fake derivation whose outPath is a JSON manifest of its inputs.
  manifest = builder: name: inputs: extra:
    fake name ({
        outPath = toFile (storeName name) (toJSON ({
            fake = builder;
            inherit name;
          }
          // jsonable inputs));
      }
      // extra);

  # A text file in the store (readable), as a fake derivation.
  textFile = name: text: extra:
    fake name ({
        outPath = toFile (storeName name) text;
        inherit text;
      }
      // extra);

  package = pname: extra:
    fake pname ({
        inherit pname;
        meta.mainProgram = pname;
      }
      // extra);

  # packaging/nix/virtufin.nix, as far as the units go: the fake build
  # reads which files of systemd/ its postInstall installs into
  # lib/systemd/system and applies its `--replace-fail FROM TO`, so the
  # evaluation sees the unit files that package would contain.
  buildRustPackage = args: let
    name = "${args.pname}-${args.version}";
    drv = fake name (args
      // {
        passthru =
          (args.passthru or {})
          // {
            systemdUnits = systemdUnitsOf drv args;
          };
        systemdUnits = systemdUnitsOf drv args;
        meta = args.meta or {};
      });
  in
    drv;

  systemdUnitsOf = drv: args: let
    script = args.postInstall or "";
    files =
      map builtins.head (builtins.filter builtins.isList
        (builtins.split "(systemd/[A-Za-z0-9@_.-]+[.](service|socket))" script));
    replace = builtins.match ".*--replace-fail \"([^\"]*)\" \"([^\"]*)\".*" script;
    rewrite = text:
      if replace == null
      then text
      else
        replaceStrings [(builtins.elemAt replace 0)]
        [(replaceStrings ["$out"] ["${drv}"] (builtins.elemAt replace 1))]
        text;
    # `src` is a lib.fileset source of this repository: the files are read
    # from the repository itself, not from a copy in the store.
    root = repo;
  in
    if !(lib.hasInfix "lib/systemd/system" script)
    then {}
    else
      builtins.listToAttrs (map (f: {
          name = baseNameOf f;
          value = rewrite (builtins.readFile (root + "/${f}"));
        })
        files);

  python3 = package "python3" {
    withPackages = f: package "python3-with-packages" {};
    interpreter = "${fakePath "python3"}/bin/python3";
  };

  base = pkgs: {
    inherit lib system;
    inherit pkgs;
    stdenv = {
      hostPlatform = {
        inherit system;
        is64bit = true;
        isLinux = true;
      };
      buildPlatform = pkgs.stdenv.hostPlatform;
      mkDerivation = args: fake (args.name or "${args.pname}-${args.version}") args;
    };
    buildPackages = pkgs;
    formats = import (nixpkgs + "/pkgs/pkgs-lib/formats.nix") {inherit lib pkgs;};

    callPackage = fn: args: let
      f =
        if isFunction fn
        then fn
        else import fn;
    in
      f (builtins.intersectAttrs (builtins.functionArgs f) pkgs // args);

    # trivial builders
    writeText = name: text: textFile name text {};
    writeTextFile = {
      name,
      text,
      executable ? false,
      destination ? "",
      ...
    } @ args:
      if destination == ""
      then textFile name text {inherit executable;}
      else manifest "writeTextFile" name args {inherit text;};
    writeShellScript = name: text:
      textFile name ''
        #!${pkgs.runtimeShell}
        ${text}
      '' {executable = true;};
    writeShellScriptBin = name: text:
      manifest "writeShellScriptBin" name {inherit text;} {meta.mainProgram = name;};
    writeShellApplication = {name, ...} @ args:
      manifest "writeShellApplication" name args {meta.mainProgram = name;};
    runCommand = name: env: script:
      manifest "runCommand" name {
        env = removeAttrs env ["passthru"];
        inherit script;
      } (env.passthru or {});
    runCommandLocal = pkgs.runCommand;
    linkFarm = name: entries:
      manifest "linkFarm" name {
        entries =
          if builtins.isList entries
          then lib.listToAttrs (map (e: lib.nameValuePair e.name e.path) entries)
          else entries;
      } {};
    mkShell = args: manifest "mkShell" "nix-shell" args {};
    runtimeShell = "${pkgs.bash}/bin/bash";

    # language builders
    rustPlatform = {inherit buildRustPackage;};
    buildGoModule = args: fake "${args.pname}-${args.version}" (args // {meta = args.meta or {};});
    fetchFromGitHub = args: fake "source" args;
    testers.runNixOSTest =
      if runNixOSTest != null
      then runNixOSTest
      else test: fake "nixos-test" {inherit test;};

    # packages
    inherit python3;
    bash = package "bash" {};
    coreutils = package "coreutils" {};
    curl = package "curl" {};
    findutils = package "findutils" {};
    gnugrep = package "gnugrep" {};
    gnused = package "gnused" {};
    iptables = package "iptables" {};
    jq = package "jq" {};
    nftables = package "nftables" {};
    util-linux = package "util-linux" {};
    systemd = package "systemd" {
      withCryptsetup = false;
      withBootloader = false;
      util-linux = pkgs.util-linux;
    };
    redis = package "redis" {serverBin = "redis-server";};
    valkey = package "valkey" {serverBin = "valkey-server";};
    remarshal = package "remarshal" {};
    remarshal_0_17 = package "remarshal" {};
    xorg.lndir = package "lndir" {};
    grpcurl = package "grpcurl" {};
    clippy = package "clippy" {};
    rustfmt = package "rustfmt" {};
    rust-analyzer = package "rust-analyzer" {};
    alejandra = package "alejandra" {};
  };
in
  lib.fix (lib.foldl' (f: overlay: lib.extends overlay f) base overlays)
