#!/usr/bin/env bash
# llama-cpp-python (the [llamacpp] extra's engine) compiled from source for this CPU's SIMD level.
#
# Portable x86-64 (GGML_NATIVE=OFF: AVX2/FMA/F16C), plus AVX-512 (F/CD/VL/DQ/BW, and VNNI, BF16,
# VBMI where the CPU has them) when /proc/cpuinfo lists it: llama.cpp's float16 and 8-bit matrix
# products prefill 1.4-1.8x faster per CPU second with them (docs/llamacpp.md). Never -march=native:
# on a Sapphire Rapids guest it compiles llama.cpp 0.3.36's AMX tile kernels, which died here with SIGILL.
# The built wheel is kept in a folder keyed by the version and these flags (pip's own cache is keyed
# by the version only, so it would hand back a wheel built with other flags); a second install
# takes seconds. Override the folder with LLAMACPP_WHEELS.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
PIP=${PIP:-"$PY -m pip"}
VERSION=0.3.36

flags="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"
cpu=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
has() { [[ "$cpu" == *" $1 "* ]]; }
if has avx512f && has avx512cd && has avx512vl && has avx512dq && has avx512bw; then
  flags+=" -DGGML_AVX512=ON"
  if has avx512_vnni; then flags+=" -DGGML_AVX512_VNNI=ON"; fi
  if has avx512_bf16; then flags+=" -DGGML_AVX512_BF16=ON"; fi
  if has avx512vbmi; then flags+=" -DGGML_AVX512_VBMI=ON"; fi
fi
if has avx_vnni; then flags+=" -DGGML_AVX_VNNI=ON"; fi

key=$(printf '%s %s' "$VERSION" "$flags" | sha256sum | cut -c1-12)
dir="${LLAMACPP_WHEELS:-$HOME/.cache/nexus-sidecar/wheels}/llama-cpp-python-$VERSION-$key"
echo "llama-cpp-python $VERSION, CMAKE_ARGS='$flags' (wheel folder $dir)"
if ! compgen -G "$dir/llama_cpp_python-*.whl" > /dev/null; then
  rm -rf "$dir.part" && mkdir -p "$dir.part"
  CMAKE_ARGS="$flags" $PIP wheel -q --no-deps --no-cache-dir -w "$dir.part" "llama-cpp-python==$VERSION"
  rm -rf "$dir"
  if compgen -G "$dir.part/llama_cpp_python-*.whl" > /dev/null; then
    mv "$dir.part" "$dir"
  else  # nothing built (a PIP that only echoes, as the install's own test uses): keep no empty folder
    rm -rf "$dir.part"
  fi
fi
# --force-reinstall: an existing install built with other flags is replaced by this one.
$PIP install -q --no-deps --force-reinstall "$dir"/llama_cpp_python-*.whl
$PIP install -q -e '.[llamacpp]'
