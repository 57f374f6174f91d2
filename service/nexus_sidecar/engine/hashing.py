"""Counter-based uniforms: u = hash(seed, group, unit, call) -> (0, 1).

No RNG state exists anywhere: the same (seed, group, unit, call) always gives the same u, on
CPU and CUDA alike, whatever batch the session runs in (batch invariance) and after a restore
from a checkpoint (nothing to persist). Integer ops only; values are kept below 2^32 inside
int64 so that wrapping multiplications keep exact low bits.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    # murmur3 finaliser: full avalanche of a 32-bit value.
    h = h & _M32
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def uniforms(seed: torch.Tensor, group: torch.Tensor, unit: torch.Tensor, call: torch.Tensor) -> torch.Tensor:
    """53-bit uniforms in (0, 1), float64, shaped like ``unit``.

    ``seed``, ``group`` and ``call`` are int64 per row ``[R]``; ``unit`` is int64 ``[R, N]`` (token
    position or block id).
    """
    seed = seed.to(torch.int64)
    s_lo = (seed & _M32)[:, None]
    s_hi = ((seed >> 32) & _M32)[:, None]
    base = _fmix32(s_lo ^ _fmix32(s_hi ^ _fmix32(group[:, None] * 0x632BE5AB + call[:, None] * 0x9E3779B1)))
    x = unit & _M32
    hi_part = _fmix32(x * 0x9E3779B1 + base)  # 32 bits
    lo_part = _fmix32((x ^ 0x5BD1E995) * 0x85EBCA6B + (base ^ 0x27D4EB2F))
    bits = ((hi_part >> 5) << 26) | (lo_part >> 6)  # 27 + 26 = 53 bits
    return (bits.to(torch.float64) + 0.5) * (2.0**-53)
