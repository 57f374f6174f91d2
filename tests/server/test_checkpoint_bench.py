"""The checkpoint benchmark's bookkeeping (no timings asserted: speed lives in the benchmark)."""

from __future__ import annotations

from nexus_sidecar.bench.checkpoint_bench import CheckpointBenchSettings, measure, service_columns
from nexus_sidecar.server.metrics import Metrics
from prometheus_client import generate_latest


def test_measure_counts_bytes_of_full_and_delta_rounds() -> None:
    s = CheckpointBenchSettings(batch_sizes=(2,), slots=64, fanout=4, cadence=3, full_every=3, rounds=4)
    rec = measure(2, s)
    assert [r["kind"] for r in rec["rounds"]] == ["full", "delta", "delta", "full"]
    full, delta = rec["rounds"][0], rec["rounds"][1]
    assert full["new_bytes"] == full["old_bytes"]  # a full checkpoint is the same bytes as before
    assert delta["new_bytes"] * 3 < delta["old_bytes"]
    assert rec["new_bytes_per_session_step"] < rec["old_bytes_per_session_step"]
    assert rec["memory_changed_fraction"] == 1.0  # Nexus's EMA moves every retained slot every step


def test_service_columns_from_two_scrapes() -> None:
    m = Metrics()
    before = generate_latest(m.registry).decode()
    m.batch_sessions.observe(64)
    m.batch_sessions.observe(64)
    m.compute_seconds.labels("cpu").observe(0.030)
    m.compute_seconds.labels("cpu").observe(0.030)
    m.checkpoint_bytes.labels("default", "delta").inc(12_800)
    m.checkpoint_seconds.labels("delta", "capture").observe(0.002)
    m.checkpoint_seconds.labels("delta", "write").observe(0.001)
    cols = service_columns(before, generate_latest(m.registry).decode())
    assert cols["ckpt_bytes_per_session_step"] == 100.0
    assert abs(cols["ckpt_engine_ms_per_call"] - 1.0) < 1e-9
    assert abs(cols["ckpt_engine_share"] - 0.002 / 0.062) < 1e-9
    assert (cols["ckpt_full"], cols["ckpt_delta"]) == (0, 1)
