"""glibc malloc tuning that keeps the server's RSS flat under bursts of large requests.

glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MiB), so
after the first burst of big requests every later multi-MiB buffer (gRPC slices, protobuf
arenas, numpy copies) comes from the heap arenas, is freed into them and fragments them: RSS
grew by ~200 MiB over five bursts of twelve 60 MB requests. A fixed threshold keeps such blocks
mmapped (returned to the OS on free) and disables the adjustment; two arenas bound the
per-thread arenas of gRPC's and the engine's threads. Measured: RSS flat over the same bursts.

The threshold is 32 MiB (glibc's own ceiling), not lower: the engine's per-call temporaries are
1-16 MiB at B = 64-256 x 4096 slots, and below the threshold they are reused from the heap; with a
1 MiB threshold each of them was an mmap + page faults + munmap, which made a B = 64 x 4096 call
2.5-4x slower inside the server than in the engine benchmark (measured: 187 ms vs 59 ms with
32 MiB, same process, same load).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("nexus_sidecar.allocator")
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_malloc(mmap_threshold_kb: int, arena_max: int = 2) -> bool:
    """Apply the tuning (glibc only; a no-op returning False elsewhere or when ``mmap_threshold_kb`` is 0)."""
    if mmap_threshold_kb <= 0:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("not glibc: malloc tuning skipped")
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold_kb * 1024)) and bool(mallopt(_M_ARENA_MAX, arena_max))
    if not ok:
        log.warning("mallopt refused the tuning (mmap threshold %d KiB, %d arenas)", mmap_threshold_kb, arena_max)
    return ok
