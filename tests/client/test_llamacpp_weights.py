"""The GGUF llama.cpp runs for ``smollm2``: a float16 re-encoding of the shipped Q4_1, made once by
llama.cpp's own ``llama_model_quantize`` and cached; the shipped file on request."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.client.conftest import require_smollm2

require_smollm2()

from nexus_client.hf.models import smollm2_gguf_path  # noqa: E402
from nexus_client.llamacpp import LlamaModel, resolve_gguf  # noqa: E402


def test_float16_copy_made_once_cached_and_loadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXUS_MODEL_CACHE", str(tmp_path))
    path = resolve_gguf("smollm2")
    assert path.parent == tmp_path / "gguf" and ".f16." in path.name and path.stat().st_mode & 0o044
    stamp = path.stat().st_mtime_ns
    assert resolve_gguf("smollm2") == path and path.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert not list((tmp_path / "gguf").glob("*.part"))
    assert resolve_gguf("smollm2", "shipped") == smollm2_gguf_path()
    with LlamaModel(path, n_ctx=256, n_batch=8, capture=False) as f16, \
            LlamaModel(smollm2_gguf_path(), n_ctx=256, n_batch=8, capture=False) as q4:
        assert f16.meta("general.file_type") == "1" and q4.meta("general.file_type") == "3"  # MOSTLY_F16, Q4_1
        assert f16.shape == q4.shape
        assert f16.tokenize("The pass key is 4711.") == q4.tokenize("The pass key is 4711.")


def test_bad_weights_name_the_field() -> None:
    with pytest.raises(ValueError, match="weights 'fp8'"):
        resolve_gguf("smollm2", "fp8")
