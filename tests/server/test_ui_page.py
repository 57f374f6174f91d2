"""The retention page (/ui/sessions/{id}): tenant-scoped, drawn from the calls the sidecar really
made, and rendered by a real headless Chromium (Debian ``chromium``) into a screenshot.

Set NEXUS_WRITE_DOCS_SCREENSHOT=1 to also write the screenshot to docs/retention-page.png (the one
the docs' service page shows).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from nexus_client.packing import WorkerSession, pack_step, top_edges, unpack_result
from nexus_client.wire import tensor_from_proto
from nexus_sidecar.bench.streams import StreamSpec, attention_rows, plant_kinds
from nexus_sidecar.server.ui_render import EVICTED, colour
from PIL import Image

from tests.server.conftest import KEYS, arun, client, http, running_sidecar

ROOT = Path(__file__).resolve().parents[2]
SID = "chat-7f3a"
CONFIG = {"policy": "nexus", "budget": 96, "seed": 3}
PREFILL, CALLS, K = 128, 60, 4
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars")


async def drive_realistic(target: str) -> None:
    """One session over the planted-token streams of the survival benchmark (sinks, strong, subtle
    and bridge tokens): a prefill, then CALLS calls of K decoded tokens."""
    g = torch.Generator().manual_seed(5)
    kind, hub_of = plant_kinds(StreamSpec(length=PREFILL + CALLS * K), 11)
    ws, cache, nxt = WorkerSession(SID, groups=1), torch.zeros(0, dtype=torch.int64), 0
    async with client(target, KEYS["acme"]) as c:
        await c.open_session(SID, CONFIG)
        for call in range(CALLS + 1):
            k = PREFILL if call == 0 else K
            new = torch.arange(nxt, nxt + k)
            nxt += k
            slots = torch.cat([cache, new])
            rows = attention_rows(slots, new, kind, hub_of, g)
            edge_pos, edge_w = top_edges(rows, slots, 8, exclude_self=False)
            (res,) = await c.step([pack_step(ws, new, rows.sum(0, keepdim=True), rows[-1:], edge_pos[None],
                                             edge_w[None])])
            keep, _ = unpack_result(res)
            cache = slots[keep[0, : slots.numel()]]
            ws.apply(res)


async def chromium(url: str, tmp: Path, *extra: str) -> str:
    """Run headless Chromium on ``url`` (while this event loop keeps serving it); its output."""
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail("chromium not found: run scripts/install_system_deps.sh (apt: chromium)", pytrace=False)
    proc = await asyncio.create_subprocess_exec(
        binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'chromium-profile'}", *extra, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode(errors="replace")


def near(img: np.ndarray, hex_colour: str, tol: int = 12) -> np.ndarray:
    """Pixels within ``tol`` of a colour (per channel)."""
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return (np.abs(img[..., :3].astype(int) - rgb) <= tol).all(-1)


def test_retention_page_real_data_tenancy_and_chromium(keys_file: Path, tmp_path: Path) -> None:
    async def body() -> None:
        async with running_sidecar(keys_file=keys_file) as sc:
            await drive_realistic(f"127.0.0.1:{sc.grpc_port}")
            path = f"/ui/sessions/{SID}"
            async with http(sc) as anon, http(sc, KEYS["globex"]) as other, http(sc, KEYS["acme-ro"]) as ro, \
                    http(sc, KEYS["acme"]) as acme:
                r = await anon.get(path)
                assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
                assert (await other.get(path)).status_code == 404  # another tenant's session does not exist
                assert (await ro.get(path)).status_code == 200  # read-only keys may look
                r = await anon.get(path, auth=("anyone", KEYS["acme"]))  # what a browser sends after the prompt
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
                page = r.text
                index = (await acme.get("/ui/sessions")).text
                assert f'href="/ui/sessions/{SID}"' in index
            # The page draws the calls the engine made: the last record is the session's state now.
            snap = await sc.sessions.describe("acme", SID, include_weights=True)
            calls = sc.sessions.history.calls("acme", SID)
            assert len(calls) == CALLS + 1 and calls[-1].step == snap.step == CALLS + 1
            g0 = snap.groups[0]
            assert calls[-1].positions.tolist() == tensor_from_proto(g0.positions, field="p").tolist()
            assert np.array_equal(calls[-1].weights, tensor_from_proto(g0.weights, field="w").numpy())
            assert sum(c.evicted_all_groups for c in calls) == snap.tokens_evicted > 0
            # ... and so does the HTML: one bar per call, evictions summing to the session's total.
            bars = re.findall(r"<title>step (\d+): (\d+) evicted, (\d+) new</title>", page)
            assert [int(s) for s, _, _ in bars] == list(range(1, CALLS + 2))
            assert sum(int(e) for _, e, _ in bars) == snap.tokens_evicted
            assert f"Retained positions over the last {CALLS + 1} calls" in page and "<svg" in page
            assert "<script" not in page and "http" not in page.replace("http://www.w3.org/2000/svg", "")
            for key, value in CONFIG.items():
                assert f"<th>{key}</th><td>{value}</td>" in page
            # A real browser: the DOM it built, and the pixels it painted.
            url = f"http://acme:{KEYS['acme']}@127.0.0.1:{sc.http_port}{path}"
            dom = await chromium(url, tmp_path, "--dump-dom")
            assert f"<title>Session {SID}</title>" in dom and dom.count("<rect") > 500
            shot = tmp_path / "retention-page.png"
            await chromium(url, tmp_path, "--window-size=1100,1060", f"--screenshot={shot}")
        img = np.asarray(Image.open(shot).convert("RGB"))
        assert img.shape[:2] == (1060, 1100)
        ramp = sum(near(img, colour(x)) for x in np.linspace(0, 1, 11)).astype(bool)
        assert ramp.mean() > 0.03, f"heatmap colours cover only {ramp.mean():.1%} of the screenshot"
        assert near(img, "#c0392b").sum() > 500, "no eviction bars painted"
        assert near(img, EVICTED, tol=3).sum() > 5000, "no evicted (grey) cells painted"
        if os.environ.get("NEXUS_WRITE_DOCS_SCREENSHOT"):
            shutil.copyfile(shot, ROOT / "docs" / "retention-page.png")

    arun(body(), timeout=300)


def test_history_tracks_the_most_recently_started_sessions_only() -> None:
    """A cap of 2: the third session to start pushes out the first, which is not re-admitted by
    its later steps (so the weight reads never rotate over every session)."""
    from nexus_sidecar.engine import Engine, PolicyConfig, StepInput
    from nexus_sidecar.server.retention_history import RetentionHistory

    engine = Engine(torch.device("cpu"))
    jobs: list = []
    hist = RetentionHistory(engine, jobs.append, sessions=2, calls=3)
    handles = {sid: engine.open(PolicyConfig(budget=4, sinks=1, recent=1, fanout=2)) for sid in ("a", "b", "c")}

    def step(sid: str, n: int) -> None:
        h = handles[sid]
        k, base = 3, 3 * (n - 1)
        inp = StepInput(torch.arange(base, base + k), torch.rand(1, len(engine.positions(h)[0]) + k),
                        torch.rand(1, len(engine.positions(h)[0]) + k), torch.full((1, k, 2), -1), torch.zeros(1, k, 2))
        out = engine.step({h: inp})[h]
        hist.record("t", sid, h, n, k, out)
        while jobs:  # the engine thread's queue, run in order
            jobs.pop(0)()

    for sid in ("a", "b", "c"):
        step(sid, 1)
    for n in range(2, 6):
        for sid in ("a", "b", "c"):
            step(sid, n)
    assert hist.calls("t", "a") == []  # pushed out when c started, never re-admitted
    for sid in ("b", "c"):
        calls = hist.calls("t", sid)
        assert [c.step for c in calls] == [3, 4, 5]  # the last 3 calls
        assert calls[-1].positions.tolist() == engine.positions(handles[sid])[0].tolist()
        assert np.array_equal(calls[-1].weights, engine.memory(handles[sid])[0].numpy())
        assert calls[-1].weights is not None and calls[0].weights is not None
    hist.forget("t", "b")
    assert hist.calls("t", "b") == []


def test_page_of_a_session_live_elsewhere_reads_the_store_and_does_not_resume_it(redis_server) -> None:
    """Two replicas on one Redis: the session lives on A; B's page shows A's last checkpoint and
    leaves the session alone (looking must not move a session to the replica that was asked)."""
    from tests.server.conftest import SMALL, SimSession, drive

    async def body() -> None:
        async with running_sidecar(store=redis_server.url, checkpoint_every=2) as a, \
                running_sidecar(store=redis_server.url, checkpoint_every=2) as b:
            sim = SimSession("elsewhere-1", config=dict(SMALL))
            async with client(a) as c:
                await c.open_session(sim.session_id, sim.config)
                await drive(c, [sim], 6)
            await asyncio.sleep(0.3)  # the step-6 checkpoint is written in the background
            async with http(b) as hb, http(a) as ha:
                r = await hb.get(f"/ui/sessions/{sim.session_id}")
                assert r.status_code == 200, r.text
                assert "the store&#x27;s checkpoint at step 6" in r.text and "not live on this replica" in r.text
                assert "No calls recorded" in r.text  # B never stepped it
                assert b.sessions.hot_sessions() == []  # not resumed by looking
                live = await ha.get(f"/ui/sessions/{sim.session_id}")
                assert "the live session on this replica" in live.text and "over the last 6 calls" in live.text
                assert (await hb.get("/ui/sessions/never-opened")).status_code == 404

    arun(body(), timeout=120)
