"""Engine test fixtures.

The engine's tensors are tiny in these tests: torch's intra-op thread pool only adds contention
on a small shared CI box (a 2-thread ``searchsorted`` on a [2, 50] row took 16 ms instead of 4 us),
so the engine tests run single-threaded and restore the setting afterwards.
"""

from __future__ import annotations


