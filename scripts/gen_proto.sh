#!/usr/bin/env bash
# Regenerates the committed protobuf/gRPC Python code next to the .proto files.
# `scripts/gen_proto.sh --check` fails when the committed code is out of date.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
out=proto
if [[ "${1:-}" == "--check" ]]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
"$PY" -m grpc_tools.protoc -Iproto --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
  proto/weightsync/v1/weightsync.proto
if [[ "${1:-}" == "--check" ]]; then
  for f in weightsync_pb2.py weightsync_pb2_grpc.py weightsync_pb2.pyi; do
    if ! cmp -s "$out/weightsync/v1/$f" "proto/weightsync/v1/$f"; then
      echo "proto/weightsync/v1/$f is stale: run scripts/gen_proto.sh and commit" >&2
      diff -u "proto/weightsync/v1/$f" "$out/weightsync/v1/$f" | head -40 >&2 || true
      exit 1
    fi
  done
  echo "generated protobuf code is up to date"
fi
