"""Build and load the fused CPU kernels (``fused_cpu.cpp``) as a torch C++ extension.

The extension is compiled by ``torch.utils.cpp_extension.load`` (g++ and ninja) into a cache
directory keyed by the source, the flags and the torch/Python versions, so an edited source or a
new torch rebuilds it and concurrent processes share one build (torch locks the directory).
``make install`` builds it ahead of time (``python -m nexus_sidecar.engine.kernels``); otherwise
the first engine that wants it builds it (~1 minute on a loaded 2-core box).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("fused_cpu.cpp")
NAME = "nexus_fused_cpu"
# -ffp-contract=off: no fused multiply-adds, so every float operation rounds as the torch
# reference's does. -fno-trapping-math changes no result (no float exception is ever looked at); it
# lets the compiler turn float compare-and-select into vector blends. No -march=native: a build must
# run on any x86-64 (or ARM) host sharing the cache.
CFLAGS = ("-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp")
LDFLAGS = ("-fopenmp",)


def cache_root() -> Path:
    """Where builds live: ``$NEXUS_KERNEL_CACHE``, else ``$XDG_CACHE_HOME`` or ``~/.cache``, under nexus-sidecar."""
    if os.environ.get("NEXUS_KERNEL_CACHE"):
        return Path(os.environ["NEXUS_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nexus-sidecar" / "kernels"


def build_dir() -> Path:
    """The build directory of this source, flags, torch and Python."""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(CFLAGS + LDFLAGS).encode(), torch.__version__.encode(),
                 sys.version.encode()):
        h.update(part)
        h.update(b"\0")
    return cache_root() / f"{NAME}-{h.hexdigest()[:16]}"


def build(verbose: bool = False) -> ModuleType:
    """Compile (if needed) and import the extension; raises if the toolchain fails.

    A finished build is imported directly: a host that runs a prebuilt cache (an image) needs
    neither the compiler nor ninja, and a process start costs no ninja check.
    """
    path = build_dir()
    built = path / f"{NAME}.so"
    # torch holds ``lock`` in the directory while it builds: then the .so may be half written, and
    # load() below waits for the other process's build instead.
    if built.exists() and not (path / "lock").exists():
        spec = importlib.util.spec_from_file_location(NAME, built)
        if spec is not None and spec.loader is not None:
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
    from torch.utils.cpp_extension import load

    path.mkdir(parents=True, exist_ok=True)
    return load(name=NAME, sources=[str(SOURCE)], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                build_directory=str(path), verbose=verbose)
