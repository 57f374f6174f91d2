"""The service benchmark's bookkeeping: the overhead columns from throughput and from two /metrics
scrapes, and the CPU clocks it reads (no speed asserted: speed lives in the benchmark)."""

from __future__ import annotations

import os
import threading
import time

from nexus_sidecar.bench.service_bench import overhead, process_cpu_seconds, server_side, thread_cpu_seconds
from nexus_sidecar.server.metrics import Metrics
from nexus_sidecar.server.sessions import os_thread_name
from prometheus_client import generate_latest


def test_overhead_from_throughput_and_engine_time() -> None:
    cols = overhead({"B": 64, "service_session_steps_per_s": 1600.0, "engine_ms_per_call": 30.0})
    assert abs(cols["service_ms_per_rpc"] - 40.0) < 1e-9  # 64 steps at 1,600/s
    assert abs(cols["server_overhead_us_per_session_step"] - 10_000 / 64) < 1e-9
    assert abs(cols["service_vs_engine_time"] - 40 / 30) < 1e-9


def test_server_side_overhead_excludes_queue_wait_and_the_engine_call() -> None:
    m = Metrics()
    before = generate_latest(m.registry).decode()
    for _ in range(2):  # two StepBatch RPCs of 64 sessions, one engine call each
        m.request_seconds.labels("StepBatch", "OK").observe(0.050)
        m.queue_seconds.observe(0.010)
        m.compute_seconds.labels("cpu").observe(0.030)
        m.batch_sessions.observe(64)
    m.request_seconds.labels("OpenSession", "OK").observe(5.0)  # not a step: ignored
    cols = server_side(before, generate_latest(m.registry).decode())
    assert abs(cols["server_ms_per_rpc"] - 50.0) < 1e-9
    assert abs(cols["server_engine_ms_per_call"] - 30.0) < 1e-9
    assert abs(cols["server_overhead_us_server_side"] - 2 * 10_000 / 128) < 1e-6

    # The per-session form queued one job per step: the queue wait per RPC is the mean sample.
    m2 = Metrics()
    before = generate_latest(m2.registry).decode()
    m2.request_seconds.labels("Step", "OK").observe(0.050)
    for _ in range(8):
        m2.queue_seconds.observe(0.010)
    m2.compute_seconds.labels("cpu").observe(0.030)
    m2.batch_sessions.observe(8)
    cols = server_side(before, generate_latest(m2.registry).decode())
    assert abs(cols["server_overhead_us_server_side"] - 10_000 / 8) < 1e-6
    assert server_side(before, before) == {}


def test_thread_clocks_read_a_threads_cpu_to_the_millisecond() -> None:
    # A named thread burns ~60 ms of CPU and stays alive (an ended thread leaves /proc); the /proc clock
    # of its name must agree with the thread's own clock (time.thread_time) far closer than stat's 10 ms
    # ticks could.
    burned: list[float] = []
    done, release = threading.Event(), threading.Event()

    def burn() -> None:
        os_thread_name("clock-probe")
        c0 = time.thread_time()
        x = 0
        while time.thread_time() - c0 < 0.06:
            x += 1
        burned.append(time.thread_time() - c0)
        done.set()
        release.wait(10)

    before = thread_cpu_seconds(os.getpid()).get("clock-probe", 0.0)
    t = threading.Thread(target=burn, name="clock-probe")
    t.start()
    try:
        assert done.wait(10)
        after = thread_cpu_seconds(os.getpid())["clock-probe"]
    finally:
        release.set()
        t.join()
    assert abs((after - before) - burned[0]) < 0.002 + 0.05 * burned[0]
    assert process_cpu_seconds(os.getpid()) >= after
