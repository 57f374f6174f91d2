#!/usr/bin/env bash
# The checks that need a CUDA device, in one go (well under 10 minutes on one GPU):
#   1. the CUDA tests (`pytest -m cuda`: CPU/CUDA engine parity for every policy),
#   2. `nexus-sidecar bench engine --quick --device cuda` (B = 1, 64; N = 4096; F = 8; R = 2),
#   3. `nexus-sidecar bench service --quick --device cuda` (a real serve process on the GPU, B = 8 and
#      64, both stores, next to the engine alone on the GPU; server CPU per session-step).
# Results (JSON + markdown, the pytest log, nvidia-smi and torch's view of the device) go to
# $OUT when set (the device machine's return folder), else benchmarks/results/gpu/.
#   scripts/gpu_check.sh             PY (default python3) can be overridden
# Exit status: the first failing step's (every step still runs); 2 when no CUDA device is visible.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEST=${OUT:-benchmarks/results/gpu}
mkdir -p "$DEST"
export PYTHONPATH="$PWD/service:$PWD/client${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to torch" >&2
  exit 2
fi
{ nvidia-smi || true; "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"; } \
  > "$DEST/device.txt" 2>&1

rc=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $DEST/NAME.log, remember the first failure
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$DEST/$name.log" 2>&1
  local status=$?
  echo "gpu_check: $name exit $status ($((SECONDS - start)) s)"
  [ "$status" -ne 0 ] && [ "$rc" -eq 0 ] && rc=$status
  return 0
}

step cuda-tests 180 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/
step bench-engine 180 "$PY" -m nexus_sidecar.cli bench engine --quick --device cuda --no-progress \
  --json "$DEST/engine-quick.json"
step bench-service 240 "$PY" -m nexus_sidecar.cli bench service --quick --device cuda --no-progress \
  --json "$DEST/service-quick.json"
exit "$rc"
