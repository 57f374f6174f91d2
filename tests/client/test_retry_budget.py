"""The client's retry budget: deadline-aware exponential backoff that covers a replica restart
(default >= 15 s), and gives up once the budget is spent."""

from __future__ import annotations

import time

import pytest
from nexus_client.client import ClientOptions, NexusClient, _Budget
from nexus_client.errors import Unavailable
from nexus_sidecar.bench.procs import free_port


def test_the_default_budget_covers_a_restart() -> None:
    opts = ClientOptions("x:1")
    assert opts.retry_budget_s >= 15 and opts.retries >= 20
    b = _Budget(opts, opts.retries + 1, time.monotonic())
    waits = [b.pause(i) for i in range(12)]
    assert all(w is not None and 0 < w <= opts.max_backoff_s * 1.5 for w in waits)
    assert waits[0] < 0.1 < waits[-1]  # exponential, then capped


def test_an_unreachable_sidecar_is_retried_until_the_budget_is_spent() -> None:
    opts = ClientOptions(f"127.0.0.1:{free_port()}", retry_budget_s=1.5, backoff_s=0.05, max_backoff_s=0.3,
                         timeout_s=5)
    with NexusClient(opts) as c:
        t0 = time.monotonic()
        with pytest.raises(Unavailable):
            c.list_policies()
        elapsed = time.monotonic() - t0
    assert 1.3 <= elapsed <= 3.0, elapsed


def test_attempt_deadlines_are_cut_to_the_budget_left() -> None:
    opts = ClientOptions("x:1", timeout_s=5.0, retry_budget_s=2.0)
    b = _Budget(opts, 10, time.monotonic() - 1.5)  # 0.5 s of the budget left
    assert b.timeout() <= 0.5
    assert b.pause(0) is not None and b.pause(0) <= 0.45
    assert _Budget(opts, 10, time.monotonic() - 2.5).pause(0) is None
    assert _Budget(opts, 1, time.monotonic()).timeout() == 5.0  # no retries: the plain per-attempt deadline
