# The Cargo workspace as one package: virtufin-api,
# virtufin-websocketmanager, virtufin-workmanager and the virtufin CLI,
# plus the systemd units from systemd/ (three services, six sockets) (the one definition of the
# units; only their ExecStart= path is rewritten from /usr/bin to $out/bin).
{
  lib,
  rustPlatform,
}: let
  fs = lib.fileset;
  root = ../..;
  workspace = builtins.fromTOML (builtins.readFile ../../Cargo.toml);
in
  rustPlatform.buildRustPackage {
    pname = "virtufin";
    inherit (workspace.workspace.package) version;

    src = fs.toSource {
      inherit root;
      fileset = fs.unions [
        ../../Cargo.toml
        ../../Cargo.lock
        ../../clippy.toml
        ../../proto
        ../../services
        ../../systemd
      ];
    };

    # Every dependency comes from crates.io and is pinned by Cargo.lock
    # (no git sources, so no outputHashes).
    cargoLock.lockFile = ../../Cargo.lock;

    # No protoc: proto/build.rs compiles the .proto files with protox.
    # The test suite starts real valkey-server instances, Python workers and
    # grpcurl; it runs in the flake's `checks.<system>.test` derivation
    # (checks/rust.nix), not here.
    doCheck = false;

    postInstall = ''
      # A WebSocket echo peer for the container chain test, not a product.
      rm -f $out/bin/virtufin-ws-echo

      install -Dm644 -t $out/lib/systemd/system \
        systemd/virtufin-api.service \
        systemd/virtufin-websocketmanager.service \
        systemd/virtufin-workmanager.service \
        systemd/virtufin-api-http.socket \
        systemd/virtufin-api-grpc.socket \
        systemd/virtufin-websocketmanager-http.socket \
        systemd/virtufin-websocketmanager-grpc.socket \
        systemd/virtufin-workmanager-http.socket \
        systemd/virtufin-workmanager-grpc.socket
      substituteInPlace $out/lib/systemd/system/virtufin-*.service \
        --replace-fail "ExecStart=/usr/bin/" "ExecStart=$out/bin/"
    '';

    meta = {
      description = "Virtufin services (api, websocketmanager, workmanager) native to systemd, and the virtufin CLI";
      homepage = "https://github.com/virtufin/virtufin-rs";
      license = lib.licenses.asl20;
      mainProgram = "virtufin";
      platforms = lib.platforms.linux;
    };
  }
