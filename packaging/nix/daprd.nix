# daprd, the Dapr sidecar: nixpkgs has only the Dapr CLI (dapr-cli), so it is
# built here from github.com/dapr/dapr's cmd/daprd, the way its Makefile
# does (build tags select the components, ldflags the version).
#
# Hashes:
# - src.hash is real: the NAR hash (sha256, SRI) of `git archive v1.18.3` of
#   github.com/dapr/dapr (tag commit 2dcf2e3548faf3c740b3d29ee300e2132db65cff),
#   computed offline with `nix-hash --type sha256`; a GitHub tarball of the
#   tag unpacks to the same tree.
# - vendorHash is NOT known: it covers the Go module downloads, which could
#   not be fetched where this file was written. It is lib.fakeHash; the
#   first build fails with "hash mismatch ... got: sha256-..." and prints
#   the right value to put here.
{
  lib,
  buildGoModule,
  fetchFromGitHub,
}:
buildGoModule rec {
  pname = "daprd";
  version = "1.18.3";

  src = fetchFromGitHub {
    owner = "dapr";
    repo = "dapr";
    rev = "v${version}";
    hash = "sha256-g42n7YB8BT82vs2i/FgdS6M7Yaez4GWqQuXF36ydzJk=";
  };

  # Unknown until the first build (see above).
  vendorHash = lib.fakeHash;

  # go.mod says `go 1.26.6`: the Go of the nixpkgs in use must be at least
  # that (nixpkgs has buildGo126Module when its default Go is older).
  subPackages = ["cmd/daprd"];

  # The stable components, among them state.redis, pubsub.redis and
  # secretstores.local.file (cmd/daprd/components/*.go build tags).
  tags = ["stablecomponents"];

  ldflags = [
    "-s"
    "-w"
    "-X github.com/dapr/dapr/pkg/buildinfo.version=${version}"
    "-X github.com/dapr/dapr/pkg/buildinfo.gitversion=v${version}"
    "-X github.com/dapr/kit/logger.DaprVersion=${version}"
  ];

  # The unit tests need a Dapr control plane and network.
  doCheck = false;

  meta = {
    description = "Dapr sidecar runtime (daprd)";
    homepage = "https://dapr.io";
    license = lib.licenses.asl20;
    mainProgram = "daprd";
    platforms = lib.platforms.linux;
  };
}
