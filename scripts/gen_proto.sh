#!/usr/bin/env bash
# Regenerate the checked-in protobuf/gRPC modules of the wire contract.
#
#   scripts/gen_proto.sh            # writes client/nexus_client/v1/
#   scripts/gen_proto.sh OUT_DIR    # writes into OUT_DIR (the staleness test compares the two)
#
# protoc runs with `-I proto` so the descriptor's file name stays "nexus/v1/sidecar.proto"
# (what reflection and other languages see); the generated grpc module's absolute import
# `from nexus.v1 import ...` is then rewritten to the installed package `nexus_client.v1`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/client/nexus_client/v1}"
PY="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

wkt="$("$PY" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')"
cd "$root"
protos=(proto/nexus/v1/*.proto)
"$PY" -m grpc_tools.protoc -I proto -I "$wkt" \
  --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
  "${protos[@]#proto/}"

mkdir -p "$out"
for f in "$tmp"/nexus/v1/*.py "$tmp"/nexus/v1/*.pyi; do
  # Package-relative import path: nexus.v1 -> nexus_client.v1 (both `from` and `import` forms).
  sed -E -e 's/^from nexus\.v1 import /from nexus_client.v1 import /' \
         -e 's/^import nexus\.v1\./import nexus_client.v1./' \
         "$f" > "$out/$(basename "$f")"
done
if [ ! -f "$out/__init__.py" ]; then
  printf '"""Generated protobuf/gRPC modules of nexus.v1 (regenerate with scripts/gen_proto.sh)."""\n' \
    > "$out/__init__.py"
fi
