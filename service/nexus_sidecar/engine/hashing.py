"""Counter-based uniforms: u = hash(seed, group, unit, call) -> (0, 1).

No RNG state exists anywhere: the same (seed, group, unit, call) always gives the same u, on
CPU and CUDA alike, whatever batch the session runs in (batch invariance) and after a restore
from a checkpoint (nothing to persist). The mixer is SplitMix64's finaliser in int64 torch
arithmetic: multiplications wrap mod 2^64 (two's complement), and right shifts are made
logical with a mask because torch shifts signed integers arithmetically.
"""

from __future__ import annotations

import torch

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64
_C1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_C2 = -7723592293110705685  # 0x94D049BB133111EB
_GROUP = 0x632BE59BD9B4E019
_CALL = 0x2545F4914F6CDD1D


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser (a bijection of 64-bit values with full avalanche)."""
    x = x ^ _shr(x, 30)
    x = x * _C1
    x = x ^ _shr(x, 27)
    x = x * _C2
    return x ^ _shr(x, 31)


def uniforms(seed: torch.Tensor, group: torch.Tensor, unit: torch.Tensor, call: torch.Tensor) -> torch.Tensor:
    """53-bit uniforms in (0, 1), float64, shaped like ``unit``.

    ``seed``, ``group`` and ``call`` are int64 per row ``[R]``; ``unit`` is int64 ``[R, N]`` (token
    position or block id).
    """
    key = mix64(mix64(seed.to(torch.int64) + _GOLDEN) ^ (group * _GROUP + call * _CALL))
    x = mix64(unit * _GOLDEN + key.unsqueeze(1))
    return (_shr(x, 11).to(torch.float64) + 0.5) * (2.0**-53)
