"""Bias correction of an EMA started at 0: the denominators ``1 - gamma^a`` as a shared table.

``m_a = gamma m_{a-1} + (1 - gamma) s`` started at ``m_0 = 0`` underestimates by ``1 - gamma^a``
after ``a`` updates. The table replaces a float32 ``pow`` over every slot (one transcendental pass
per call) with a lookup, and gives the torch reference and the fused kernels the very same
float32 denominators: ``gamma^a`` is computed once in float64 on the host from the float32
``gamma`` and rounded, then ``1 - gamma^a`` in float32, as the reference always did.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

# Past this many entries the table is cut to the ages actually present (gamma very close to 1).
_FULL_TABLE = 4096


@functools.lru_cache(maxsize=64)
def _saturation(gamma: float) -> int:
    """Smallest table length whose last entry is exactly 1.0 in float32 (all later ones are too)."""
    g = float(np.float32(gamma))
    a = 0
    while np.float32(1.0) - np.float32(g**a) != np.float32(1.0):
        a += 1
    return a + 1


@functools.lru_cache(maxsize=64)
def _table(gamma: float, length: int, device: torch.device) -> torch.Tensor:
    g = float(np.float32(gamma))
    powers = torch.tensor([g**a for a in range(length)], dtype=torch.float64).to(torch.float32)
    return (1.0 - powers).to(device)


def denominators(gamma: float, max_age: int | None, device: torch.device) -> torch.Tensor:
    """float32 ``[L]``: entry ``a`` is ``1 - gamma^a`` for ``a < L``; ages >= L - 1 use the last entry,
    which is exactly 1.0 or covers ``max_age`` (the largest ``age + 1`` looked up; None = unknown)."""
    sat = _saturation(gamma)
    if sat <= _FULL_TABLE or max_age is None:
        return _table(gamma, sat, device)
    length = min(sat, 1 << max(12, int(max_age + 1).bit_length()))
    return _table(gamma, length, device)


def bias_corrected(memory: torch.Tensor, age: torch.Tensor, gamma: float) -> torch.Tensor:
    """``memory / (1 - gamma^(age + 1))`` with ``age`` (int) the updates before this one."""
    step = age + 1
    table = denominators(gamma, int(step.max()) if step.numel() and _saturation(gamma) > _FULL_TABLE else None,
                         memory.device)
    return memory / table[step.clamp_(0, table.numel() - 1)]
