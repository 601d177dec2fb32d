# daprd, the Dapr sidecar, built from this repository's small Go module
# (packaging/daprd): dapr's own entry point with exactly the components the
# deployment renders (state.redis, pubsub.redis, secretstores.local.file).
# nixpkgs has only the Dapr CLI (dapr-cli). CI builds the same module with
# packaging/daprd/build.sh and checks vendorHash against it (scripts/daprd).
#
# Go: go.mod says `go 1.24.13` (dapr v1.17.0's own requirement); the
# buildGoModule of nixos-unstable (Go 1.26) satisfies it.
{
  lib,
  buildGoModule,
}: let
  version = "1.17.0";
in
  buildGoModule {
    pname = "daprd";
    inherit version;

    src = lib.fileset.toSource {
      root = ../daprd;
      fileset = lib.fileset.unions [
        ../daprd/go.mod
        ../daprd/go.sum
        ../daprd/main.go
        ../daprd/notag.go.in
      ];
    };

    # The NAR hash of `go mod vendor`'s tree for go.mod/go.sum, computed with
    # nix-hash by packaging/daprd/build.sh (scripts/daprd fails when it
    # differs from this line).
    vendorHash = "sha256-Jq5JmDo28JS/PPbtkYrZfx3/bHvK7Kf/otywMjPG6qs=";

    subPackages = ["."];

    # dapr's cmd/daprd/components/zz_notag.go panics when no component build
    # tag is set; main.go registers our components itself, so that one file
    # is swapped for notag.go.in (as build.sh does). postConfigure runs after
    # the vendor tree is in place and, unlike preBuild, not in the vendoring
    # derivation.
    postConfigure = ''
      components=$(go list -f '{{.Dir}}' github.com/dapr/dapr/cmd/daprd/components)
      printf '{"Replace":{"%s/zz_notag.go":"%s/notag.go.in"}}\n' "$components" "$PWD" >"$TMPDIR/overlay.json"
      export GOFLAGS="$GOFLAGS -overlay=$TMPDIR/overlay.json"
    '';

    ldflags = [
      "-s"
      "-w"
      "-X github.com/dapr/dapr/pkg/buildinfo.version=${version}"
      "-X github.com/dapr/dapr/pkg/buildinfo.gitversion=v${version}"
      "-X github.com/dapr/kit/logger.DaprVersion=${version}"
    ];

    # No tests in the module itself.
    doCheck = false;

    meta = {
      description = "Dapr sidecar runtime (daprd) with the components virtufin uses";
      homepage = "https://dapr.io";
      license = lib.licenses.asl20;
      mainProgram = "daprd";
      platforms = lib.platforms.linux;
    };
  }
