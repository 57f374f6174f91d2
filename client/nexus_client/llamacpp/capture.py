"""Reading every layer's post-RoPE queries and keys (and values) out of ``llama_decode``.

llama.cpp runs the model as a ggml graph and, when ``llama_context_params.cb_eval`` is set, asks
the callback about every graph node (``ask = true``: "do you want to see this one?") and then hands
it each accepted node once computed (``ask = false``). In the Llama graph (``src/models/llama.cpp``)
the names ``Qcur-<l>``/``Kcur-<l>`` label several nodes of layer ``l``: the projection's output
and, the one we take, the output of ``ggml_rope_ext`` (op ``ROPE``): post-RoPE, float32,
``ne = [head_dim, n_head(_kv), n_tokens]``, i.e. in memory ``[n_tokens, heads, head_dim]``.
``Vcur-<l>`` is the value projection reshaped to heads (op ``RESHAPE``, no RoPE),
``[n_tokens, n_head_kv, head_dim]``. (Checked on llama-cpp-python 0.3.36: per layer the callback
sees ``Qcur`` as MUL_MAT, RESHAPE and ROPE nodes, ``Kcur`` likewise, ``Vcur`` as MUL_MAT and RESHAPE.)

Layout note: GGUF stores Llama's Q/K projection rows permuted so that llama.cpp rotates adjacent
pairs (``x[2i], x[2i+1]``) where transformers rotates halves (``x[i], x[i + d/2]``). The captured
q/k are therefore a fixed permutation of transformers' along ``head_dim`` (:func:`to_hf_layout`
undoes it). Every summary quantity (q.k, key norms, key cosines) is invariant to a permutation
shared by q and k, so the worker uses them as captured.

A ``llama_decode`` whose batch is larger than ``n_ubatch`` runs as several graphs in token order
(unified KV cache: ``split_simple``); the chunks are concatenated along tokens.
"""

from __future__ import annotations

import ctypes
import re
from typing import Any

import numpy as np
import torch

from nexus_client.llamacpp.library import GGML_TYPE_F32, GgmlTensor, ggml_base, llama, op_name

_NAME = re.compile(rb"^([QKV])cur-(\d+)$")


def to_hf_layout(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's Q/K (adjacent-pair RoPE order) in transformers' order (half-split RoPE) along
    the last dim: element ``2i + r`` moves to ``r * d/2 + i``."""
    d = x.shape[-1]
    return x.reshape(*x.shape[:-1], d // 2, 2).transpose(-1, -2).reshape(*x.shape[:-1], d)


class QKVCapture:
    """The ``cb_eval`` of one llama context: collects each layer's post-RoPE Q, K (and V).

    After :meth:`start` and one ``llama_decode`` of ``n`` tokens, :meth:`finish` returns per layer
    ``q [n, n_head, d]``, ``k [n, n_head_kv, d]`` and ``v [n, n_head_kv, d]`` (float32, batch
    order). ``values``: also copy V (only the value-norm prior reads it).
    The ctypes callback object is kept on the instance: llama.cpp holds a raw pointer to it.
    """

    def __init__(self, n_layer: int, values: bool = True) -> None:
        self.n_layer = n_layer
        self.values = values
        self.active = False
        self._lib = ggml_base()
        self._parts: dict[tuple[bytes, int], list[np.ndarray]] = {}
        self.callback = llama().ggml_backend_sched_eval_callback(self._on_tensor)

    def start(self) -> None:
        """Arm the capture for the next ``llama_decode``."""
        self._parts = {}
        self.active = True

    def _on_tensor(self, ptr: int, ask: bool, _user: Any) -> bool:
        if not self.active:
            return not ask  # ask: no, we do not want it; otherwise: go on computing
        t = GgmlTensor.from_address(ptr)
        m = _NAME.match(t.name)
        if m is None:
            return not ask
        kind = m.group(1)
        # Q/K: the RoPE outputs. V: the projection reshaped to heads (a view of the matmul's output;
        # the 2-D matmul node carries the same name and data, taking both would count it twice).
        wanted = op_name(t.op) == "ROPE" if kind != b"V" else self.values and op_name(t.op) == "RESHAPE"
        if ask:
            return wanted
        if wanted:
            self._read(kind, int(m.group(2)), t)
        return True

    def _read(self, kind: bytes, layer: int, t: GgmlTensor) -> None:
        if t.type != GGML_TYPE_F32:
            raise RuntimeError(f"{t.name.decode()}: expected float32, got ggml type {t.type}")
        d, h, n = int(t.ne[0]), int(t.ne[1]), int(t.ne[2])
        if t.nb[0] != 4 or t.nb[1] != 4 * d or t.nb[2] != 4 * d * h:
            raise RuntimeError(f"{t.name.decode()}: not contiguous (nb = {list(t.nb)}); cannot copy it out")
        out = np.empty((n, h, d), dtype=np.float32)
        self._lib.ggml_backend_tensor_get(ctypes.addressof(t), out.ctypes.data, 0, out.nbytes)
        parts = self._parts.setdefault((kind, layer), [])
        parts.append(out)

    def finish(self, n_tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Disarm and return per layer ``(q, k, v)`` of the ``n_tokens`` tokens decoded (v empty
        when not captured). Raises when a layer is missing or covers another token count."""
        self.active = False
        kinds = [b"Q", b"K"] + ([b"V"] if self.values else [])
        out: dict[bytes, list[torch.Tensor]] = {k: [] for k in (b"Q", b"K", b"V")}
        for kind in kinds:
            for layer in range(self.n_layer):
                parts = self._parts.get((kind, layer))
                if not parts:
                    raise RuntimeError(f"{kind.decode()}cur-{layer} was not seen during llama_decode: "
                                       "is this a Llama-architecture model?")
                x = torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0])
                if x.shape[0] != n_tokens:
                    raise RuntimeError(f"{kind.decode()}cur-{layer} covers {x.shape[0]} tokens, decoded {n_tokens}")
                out[kind].append(x)
        self._parts = {}
        return out[b"Q"], out[b"K"], out[b"V"]

