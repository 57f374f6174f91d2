"""The worker's copy of one sequence's retained keys (and values), in slot order.

llama.cpp keeps a sequence's K/V in cells of a shared pool, in whatever cells were free, as float16,
and its C API gives no way to read them back in position order short of serialising the sequence.
The summary needs every retained slot's post-RoPE key (and, for the value-norm prior, its value),
so the worker mirrors them from the graph capture: new tokens' K/V are appended, and the same keep
masks that llama.cpp's cache gets (as ``seq_rm`` ranges) compact the mirror. It presents the
``cache.layers[i].keys/values`` (``[1, Hkv, L, D]``) shape of a transformers ``DynamicCache`` so
the worker's existing cache tools (:func:`~nexus_client.hf.cache_surgery.apply_keep_mask` for the
cuts, :func:`~nexus_client.hf.capture.cache_kv` feeding :func:`nexus_client.summary.summarize`)
run on it unchanged.

Memory: ``layers x Hkv x D x 4 bytes`` per token for the keys, the same again for values:
SmolLM2-135M (30 layers, 3 KV heads, D = 64) 23 KiB per token for keys, 46 KiB with values; at a
budget of 410 slots plus a 64-token chunk about 21 MiB per sequence (buffers grow by doubling, so
up to twice that). The float32 mirror holds the values before llama.cpp rounds them to float16.
"""

from __future__ import annotations

import torch


class MirrorLayer:
    """One layer's keys and values, ``[1, Hkv, L, D]`` views over growable buffers."""

    def __init__(self, n_head_kv: int, head_dim: int, values: bool) -> None:
        self._k = torch.empty(n_head_kv, 16, head_dim)
        self._v = torch.empty(n_head_kv, 16, head_dim) if values else None
        self._nk = 0
        self._nv = 0

    def __len__(self) -> int:
        if self._v is not None and self._nv != self._nk:
            raise RuntimeError(f"mirror layer holds {self._nk} keys but {self._nv} values")
        return self._nk

    @property
    def keys(self) -> torch.Tensor:
        """The retained keys, ``[1, Hkv, L, D]`` (a view: copy before keeping it past a change)."""
        return self._k[:, : self._nk].unsqueeze(0)

    @keys.setter
    def keys(self, x: torch.Tensor) -> None:
        self._k, self._nk = _write(self._k, x)

    @property
    def values(self) -> torch.Tensor:
        """The retained values, ``[1, Hkv, L, D]``."""
        if self._v is None:
            raise RuntimeError("this mirror keeps no values (the policy reads no prior)")
        return self._v[:, : self._nv].unsqueeze(0)

    @values.setter
    def values(self, x: torch.Tensor) -> None:
        if self._v is None:
            return  # nothing to compact
        self._v, self._nv = _write(self._v, x)

    def append(self, k: torch.Tensor, v: torch.Tensor | None) -> None:
        """Append new tokens' ``k``/``v`` given as ``[n, Hkv, D]`` (llama.cpp's layout)."""
        self._k, self._nk = _append(self._k, self._nk, k)
        if self._v is not None:
            if v is None:
                raise ValueError("this mirror keeps values: pass the new tokens' v")
            self._v, self._nv = _append(self._v, self._nv, v)


def _write(buf: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A new buffer (the capacity of ``buf``) holding ``x`` ``[1, Hkv, m, D]`` (what cache surgery
    assigns). Never written over ``buf``: a pipelined call still reads the keys it saw through views
    of the old buffer while the cut is applied (appends only write past every view's end)."""
    m = int(x.shape[-2])
    out = torch.empty(buf.shape[0], max(m, buf.shape[1]), buf.shape[2], dtype=buf.dtype)
    out[:, :m] = x[0]
    return out, m


def _append(buf: torch.Tensor, n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    add = int(x.shape[0])
    if n + add > buf.shape[1]:
        grown = torch.empty(buf.shape[0], max(2 * buf.shape[1], n + add), buf.shape[2], dtype=buf.dtype)
        grown[:, :n] = buf[:, :n]
        buf = grown
    buf[:, n : n + add] = x.transpose(0, 1)
    return buf, n + add


class KVMirror:
    """Every layer's retained keys/values of one sequence (``.layers`` as a ``DynamicCache``)."""

    def __init__(self, n_layer: int, n_head_kv: int, head_dim: int, values: bool) -> None:
        self.layers = [MirrorLayer(n_head_kv, head_dim, values) for _ in range(n_layer)]
        self.has_values = values

    def append(self, k: list[torch.Tensor], v: list[torch.Tensor], rows: slice | torch.Tensor) -> None:
        """Append batch rows ``rows`` of every layer's captured ``k``/``v`` (``[n, Hkv, D]`` each)."""
        for i, layer in enumerate(self.layers):
            layer.append(k[i][rows], v[i][rows] if self.has_values else None)

    def lengths(self) -> list[int]:
        """Slots held per layer."""
        return [len(layer) for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes of the retained keys and values (not the buffers' spare capacity)."""
        per = sum(layer.keys.numel() for layer in self.layers) * 4
        return per * (2 if self.has_values else 1)
