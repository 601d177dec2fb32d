#!/usr/bin/env bash
# Builds daprd from this Go module (see main.go): vendors the modules in a
# scratch copy, swaps dapr's zz_notag.go for notag.go.in with
# `go build -overlay`, and stamps the dapr version the way dapr's Makefile
# does. packaging/nix/daprd.nix does the same steps with buildGoModule.
#
#   packaging/daprd/build.sh OUTPUT   (needs Go >= the `go` line of go.mod)
#
# With VENDOR_HASH_OUT=FILE it also writes there the Nix hash of the vendor
# tree (SRI, what buildGoModule's vendorHash must be), computed with
# nix-hash over exactly what `go mod vendor` produced.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUTPUT-BINARY}
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$here/go.mod" "$here/go.sum" "$here/main.go" "$work/"
cd "$work"
export GOFLAGS=-mod=vendor GOTOOLCHAIN=local
go mod vendor
if [ -n "${VENDOR_HASH_OUT:-}" ]; then
  hex=$(nix-hash --type sha256 vendor)
  python3 -c 'import base64,sys; print("sha256-" + base64.b64encode(bytes.fromhex(sys.argv[1])).decode())' "$hex" >"$VENDOR_HASH_OUT"
fi
components=$(go list -f '{{.Dir}}' github.com/dapr/dapr/cmd/daprd/components)
printf '{"Replace":{"%s/zz_notag.go":"%s/notag.go.in"}}\n' "$components" "$here" >overlay.json
version=$(GOFLAGS=-mod=mod go list -m -f '{{.Version}}' github.com/dapr/dapr)
go build -trimpath -overlay overlay.json -o "$out" -ldflags "-s -w \
  -X github.com/dapr/dapr/pkg/buildinfo.version=${version#v} \
  -X github.com/dapr/dapr/pkg/buildinfo.gitversion=${version} \
  -X github.com/dapr/kit/logger.DaprVersion=${version#v}" .
