"""Memory bombs against a real ``nexus-sidecar serve`` process, RSS measured from /proc.

The cases the hostile run found: 10,000 idle sessions and then one k = 2,048 step; 256
OpenSessions asking for groups = 1024; bursts of 60 MB requests. Each must be refused or served
inside the configured pool budget (plus a stated tolerance for the interpreter, torch's
allocator and gRPC's buffers), and no session may be lost.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from nexus_client.v1 import sidecar_pb2 as pb
from nexus_sidecar.bench.procs import sidecar_process

from tests.server.conftest import SimSession, arun, client, expect_error

pytestmark = pytest.mark.timeout(300)
MB = 1024 * 1024
BUDGET_MB = 256
CFG = {"policy": "nexus", "budget": 256, "sinks": 4, "recent": 16, "fanout": 8, "seed": 1}


def rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MiB, from /proc/<pid>/status."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _args() -> tuple[str, ...]:
    return ("--device", "cpu", "--torch-threads", "1", "--pool-budget-mb", str(BUDGET_MB), "--max-delay-us", "100")


async def _open_many(tgt: str, n: int, prefix: str, config: dict[str, object]) -> list[grpc.StatusCode]:
    c = client(tgt, timeout_s=60)
    sem = asyncio.Semaphore(64)
    codes: list[grpc.StatusCode] = []

    async def one(i: int) -> None:
        async with sem:
            try:
                await c.open_session(f"{prefix}{i}", config)
                codes.append(grpc.StatusCode.OK)
            except Exception as exc:
                codes.append(getattr(exc, "code", grpc.StatusCode.UNKNOWN))

    await asyncio.gather(*(one(i) for i in range(n)))
    await c.close()
    return codes


def test_ten_thousand_idle_sessions_then_a_2048_token_step(capsys: pytest.CaptureFixture[str]) -> None:
    with sidecar_process(*_args(), "--max-sessions-per-tenant", "20000") as sc:
        t0 = time.monotonic()
        codes = arun(_open_many(sc.target, 10_000, "idle", CFG), timeout=240)
        assert codes.count(grpc.StatusCode.OK) == 10_000
        rss_idle, _ = rss_mb(sc.proc.pid)

        async def big_step() -> float:
            c = client(sc.target, timeout_s=120)
            sim = SimSession("prefill", config=CFG, k_first=2048)
            small = SimSession("idle0", config=CFG)
            await c.open_session("prefill", CFG)
            p = sim.make()
            assert p.msg.ByteSize() < 400_000
            t0 = time.monotonic()
            # A small session steps at the same time: the big step must not stall it for seconds
            # (the hostile run saw ~5 s when one wide step regrew every row of the pool).
            res, small_res = await asyncio.gather(c.step([p.msg]), c.step([small.make().msg]))
            stall = time.monotonic() - t0
            res = res[0]
            assert res.step == 1 and small_res[0].step == 1
            sim.apply(p, res)
            # 0 sessions lost: a sample of the unloaded ones resumes (at step 0, from the store).
            for i in range(500, 10_000, 500):
                assert (await c.get_session(f"idle{i}")).step == 0
            await c.close()
            return stall

        stall = arun(big_step(), timeout=240)
        rss_after, peak = rss_mb(sc.proc.pid)
        seconds = time.monotonic() - t0
    with capsys.disabled():
        print(f"\n10k idle + k=2048: RSS idle {rss_idle:.0f} MiB, after {rss_after:.0f} MiB, peak {peak:.0f} MiB "
              f"(budget {BUDGET_MB} MiB), big + small step together {stall:.2f}s, {seconds:.1f}s in all")
    # Tolerance: the interpreter, torch and gRPC (~350 MiB here) plus the budget plus 200 MiB for the
    # step's transient tensors and the memory store's checkpoints of 10,000 sessions.
    assert peak < rss_idle + BUDGET_MB + 200, (rss_idle, peak)
    assert stall < 2.0, stall


def test_groups_1024_opens_are_refused_without_growth(capsys: pytest.CaptureFixture[str]) -> None:
    with sidecar_process(*_args()) as sc:
        arun(_open_many(sc.target, 8, "warm", CFG))
        before, _ = rss_mb(sc.proc.pid)
        codes = arun(_open_many(sc.target, 256, "g", {**CFG, "groups": 1024}))
        after, peak = rss_mb(sc.proc.pid)
    with capsys.disabled():
        print(f"\n256 x groups=1024: {codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)} RESOURCE_EXHAUSTED, "
              f"RSS {before:.0f} -> {after:.0f} MiB (peak {peak:.0f})")
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 256
    assert after - before < 20, (before, after)


def test_bursts_of_60_mb_requests_plateau(capsys: pytest.CaptureFixture[str]) -> None:
    with sidecar_process(*_args(), "--max-message-mb", "64") as sc:
        async def bursts() -> list[float]:
            c = client(sc.target, timeout_s=120)
            sim = SimSession("s", config=CFG)
            await c.open_session("s", CFG)
            p = sim.make()
            huge = pb.SessionStep()
            huge.CopyFrom(p.msg)
            n = 15 * MB // 1  # 15 Mi float32 = 60 MiB
            huge.attn.CopyFrom(pb.Tensor(dtype=pb.D_TYPE_FLOAT32, shape=[1, n], data=bytes(4 * n)))
            assert 60 * MB <= huge.ByteSize() < 64 * MB
            after: list[float] = []
            for _ in range(5):
                results = await asyncio.gather(*(expect_error(c.step([huge]), grpc.StatusCode.INVALID_ARGUMENT)
                                                 for _ in range(12)))
                assert all("steps[s].attn" in m for m in results), results[0]
                # The settled RSS: the least of 10 samples over the second after the burst (the
                # answers go out before the server has released every buffer of the requests).
                samples = []
                for _ in range(10):
                    await asyncio.sleep(0.1)
                    samples.append(rss_mb(sc.proc.pid)[0])
                after.append(min(samples))
            ok = (await c.step([p.msg]))[0]  # the session is untouched
            assert ok.step == 1
            await c.close()
            return after

        after = arun(bursts(), timeout=240)
        _, peak = rss_mb(sc.proc.pid)
    with capsys.disabled():
        print(f"\n5 bursts of 12 x 60 MB: RSS after each {[round(a) for a in after]} MiB, peak {peak:.0f} MiB")
    # No growth across bursts (the issue saw +640 MiB over five; the abort cycle +1.1 GiB per burst).
    # The allocator keeps a varying share between bursts (runs measured swings of up to ~350 MiB
    # either way), so the bar is on the trend and on the worst burst, not on each burst.
    assert after[-1] - after[0] < 300, after
    assert max(after) - after[0] < 450, after
    # In flight at once: 12 requests x 60 MB, each held up to three times while it is refused (gRPC's
    # receive buffer, the parsed message, the decoded float32 copy), over a ~300 MiB process, plus
    # 300 MiB of tolerance. Nothing bounds that in-flight total but max_message_mb and the number of
    # concurrent RPCs (not limited yet).
    assert peak < 300 + 3 * 12 * 60 + 300, peak


def test_concurrent_rpcs_are_bounded(capsys: pytest.CaptureFixture[str]) -> None:
    # max_concurrent_rpcs bounds what a burst can hold in flight: beyond it gRPC answers
    # RESOURCE_EXHAUSTED at once, and the client (RESOURCE_EXHAUSTED is retryable) backs off.
    with sidecar_process(*_args(), "--max-concurrent-rpcs", "3") as sc:
        async def burst() -> list[str]:
            c = client(sc.target, timeout_s=120)
            sim = SimSession("s", config=CFG)
            await c.open_session("s", CFG)
            huge = pb.SessionStep()
            huge.CopyFrom(sim.make().msg)
            n = 15 * MB
            huge.attn.CopyFrom(pb.Tensor(dtype=pb.D_TYPE_FLOAT32, shape=[1, n], data=bytes(4 * n)))

            async def one() -> str:
                try:
                    await c.step([huge])
                except Exception as exc:
                    return getattr(exc, "code", grpc.StatusCode.UNKNOWN).name
                return "OK"

            codes = await asyncio.gather(*(one() for _ in range(12)))
            await c.close()
            return codes

        codes = arun(burst(), timeout=120)
        _, peak = rss_mb(sc.proc.pid)
    with capsys.disabled():
        print(f"\n12 x 60 MB with max_concurrent_rpcs=3: codes {sorted(set(codes))} x "
              f"{[codes.count(k) for k in sorted(set(codes))]}, peak RSS {peak:.0f} MiB")
    assert "RESOURCE_EXHAUSTED" in codes and set(codes) <= {"RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"}
