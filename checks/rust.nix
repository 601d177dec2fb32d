# The flake's Rust checks: the whole test suite (with the real valkey-server,
# Python workers, the Python `websockets` peer and stock grpcurl it starts),
# clippy with -D warnings, rustfmt, and alejandra over the .nix files.
{
  pkgs,
  virtufin,
  flakeSource,
}: let
  python = pkgs.python3.withPackages (ps: [ps.websockets]);
in {
  test = virtufin.overrideAttrs (old: {
    pname = "virtufin-test";
    doCheck = true;
    nativeCheckInputs =
      (old.nativeCheckInputs or [])
      ++ [
        pkgs.valkey
        python
        pkgs.grpcurl
      ];
    cargoTestFlags = ["--workspace"];
    # The tests bind their own ports on 127.0.0.1 (the build sandbox has
    # loopback only) and keep scratch files under $HOME.
    preCheck = ''
      export HOME=$TMPDIR
    '';
  });

  clippy = virtufin.overrideAttrs (old: {
    pname = "virtufin-clippy";
    nativeBuildInputs = old.nativeBuildInputs ++ [pkgs.clippy];
    buildPhase = ''
      runHook preBuild
      cargo clippy --workspace --all-targets --locked --offline -- -D warnings
      runHook postBuild
    '';
    installPhase = ''
      touch $out
    '';
    doCheck = false;
  });

  rustfmt = pkgs.runCommand "virtufin-rustfmt" {nativeBuildInputs = [pkgs.rustfmt];} ''
    cd ${virtufin.src}
    find proto services -name '*.rs' -print0 | xargs -0 rustfmt --check --edition 2024
    touch $out
  '';

  nix-format = pkgs.runCommand "virtufin-nix-format" {nativeBuildInputs = [pkgs.alejandra];} ''
    alejandra --check ${flakeSource}
    touch $out
  '';
}
