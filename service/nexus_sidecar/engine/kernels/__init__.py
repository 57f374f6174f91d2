"""Which kernels an engine runs: the pure-torch reference or the fused CPU extension.

``NEXUS_ENGINE_KERNELS`` (or ``Engine(kernels=...)``) picks: ``torch`` (the reference, every
device), ``fused`` (the C++ kernels on CPU; CUDA engines keep the torch path), or ``auto`` (the
default: ``fused`` on CPU). If the extension cannot be built or loaded, the engine logs a warning
once and runs the torch path; ``make install`` builds it, and the agreement tests require it.
"""

from __future__ import annotations

import logging
import os
import threading
from types import ModuleType

import torch

from nexus_sidecar.engine.errors import ConfigError

MODES = ("auto", "fused", "torch")
ENV = "NEXUS_ENGINE_KERNELS"
log = logging.getLogger(__name__)

_lock = threading.Lock()
_loaded: ModuleType | None = None
_failure: str | None = None


def resolve(mode: str | None) -> str:
    """The validated mode: ``mode`` if given, else ``$NEXUS_ENGINE_KERNELS``, else ``auto``."""
    value = mode if mode is not None else os.environ.get(ENV, "auto")
    if value not in MODES:
        raise ConfigError("kernels" if mode is not None else ENV, f"must be one of {list(MODES)}, got {value!r}")
    return value


def load() -> ModuleType | None:
    """The fused CPU extension, built on first use; None (after one logged warning) if it cannot be."""
    global _loaded, _failure
    with _lock:
        if _loaded is None and _failure is None:
            from nexus_sidecar.engine.kernels.loader import build

            try:
                _loaded = build()
            except Exception as exc:
                _failure = f"{type(exc).__name__}: {exc}"
                log.warning("fused engine kernels unavailable, running the torch path: %s", _failure)
        return _loaded


def failure() -> str | None:
    """Why the extension could not be loaded (None if it loaded or was never tried)."""
    return _failure


def for_device(device: torch.device, mode: str | None = None) -> ModuleType | None:
    """The fused kernels an engine on ``device`` runs, or None for the torch path."""
    if resolve(mode) == "torch" or device.type != "cpu":
        return None
    return load()
