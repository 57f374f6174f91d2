"""Server test helpers: an in-process sidecar on loopback ports, simulated worker sessions that
produce valid steps, an in-process reference engine, and small async/HTTP utilities.

Nothing here mocks a real component: the sidecar serves real gRPC and HTTP on 127.0.0.1, the
clients are the real ``nexus_client`` clients, the reference is the real ``Engine``.

There is no pytest-asyncio: each test drives its own event loop with :func:`arun`, which bounds
the whole body with a timeout, and :func:`running_sidecar` always stops the sidecar.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import pytest
import torch
from nexus_client.client import AsyncNexusClient, ClientOptions
from nexus_client.errors import SidecarError
from nexus_client.packing import WorkerSession, pack_step, unpack_result
from nexus_client.v1 import sidecar_pb2 as pb
from nexus_sidecar.engine import Engine, PolicyConfig, StepInput, StepOutput
from nexus_sidecar.server.app import Sidecar
from nexus_sidecar.server.settings import ServerSettings
from prometheus_client.parser import text_string_to_metric_families

T = TypeVar("T")

# Keys file: two tenants, and a read-only key of the first one.
KEYS = {
    "acme": "acme-rw-key-0123456789abcdef",
    "acme-ro": "acme-ro-key-0123456789abcdef",
    "globex": "globex-rw-key-0123456789abcdef",
}
KEYS_FILE_TEXT = (
    "# tenant  key  scope\n"
    f"acme   {KEYS['acme']}   rw\n"
    f"acme   {KEYS['acme-ro']}   ro\n"
    f"globex {KEYS['globex']}\n"
)

# A small config: evictions start after a few steps, cheap on a shared 2-core box.
SMALL = {"policy": "nexus", "budget": 24, "sinks": 2, "recent": 4, "fanout": 4, "seed": 7}



@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    """A real keys file (acme rw + ro, globex rw)."""
    path = tmp_path / "keys"
    path.write_text(KEYS_FILE_TEXT)
    return path


def arun(coro: Awaitable[T], timeout: float = 60.0) -> T:
    """Run ``coro`` in a fresh event loop, bounded by ``timeout`` seconds."""

    async def main() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(main())


def settings(**overrides: Any) -> ServerSettings:
    """Loopback ports picked by the OS, CPU device, fast batches; ``overrides`` win."""
    base: dict[str, Any] = {
        "grpc_host": "127.0.0.1", "grpc_port": 0, "http_host": "127.0.0.1", "http_port": 0, "device": "cpu",
        "max_delay_us": 200, "shutdown_grace_s": 1.0,
    }
    return ServerSettings(**{**base, **overrides})


@contextlib.asynccontextmanager
async def running_sidecar(**overrides: Any) -> AsyncIterator[Sidecar]:
    """An in-process sidecar started in the running loop; always stopped (bounded)."""
    sc = Sidecar(settings(**overrides))
    await sc.start()
    try:
        yield sc
    finally:
        await asyncio.wait_for(sc.stop(grace=0.5), 30)


def target(sc: Sidecar) -> str:
    return f"127.0.0.1:{sc.grpc_port}"


def client(tgt: str | Sidecar, key: str | None = None, timeout_s: float = 15.0) -> AsyncNexusClient:
    """The real asyncio client, without retries (so every status code is seen as sent)."""
    t = target(tgt) if isinstance(tgt, Sidecar) else tgt
    return AsyncNexusClient(ClientOptions(t, api_key=key, timeout_s=timeout_s, retries=0))


async def expect_error(call: Awaitable[Any], code: grpc.StatusCode) -> str:
    """Await ``call``; it must fail with ``code``. Returns the server's message."""
    try:
        result = await call
    except SidecarError as exc:
        assert exc.code == code, f"expected {code.name}, got {exc.code.name}: {exc.details}"
        return exc.details
    raise AssertionError(f"expected {code.name}, the call succeeded: {result}")


async def wait_until(pred: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0, what: str = "condition"
                     ) -> None:
    """Poll ``pred`` (sync or async) every 50 ms until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def http(sc: Sidecar | int, key: str | None = None) -> httpx.AsyncClient:
    """An HTTP client on the sidecar's side port (bearer key if given)."""
    port = sc.http_port if isinstance(sc, Sidecar) else sc
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=10.0)


def metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a Prometheus exposition text, parsed by prometheus_client."""
    return [(s.name, dict(s.labels), s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def sample_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0 when absent)."""
    return sum(v for n, lab, v in metric_samples(text) if n == name and all(lab.get(k) == x for k, x in
                                                                             labels.items()))


# -- simulated worker sessions ----------------------------------------------------------------
@dataclass
class Planned:
    """One step a simulated worker is about to send."""

    msg: pb.SessionStep
    inp: StepInput  # the same tensors as the engine sees them (float32 / int64)
    new: torch.Tensor


@dataclass
class SimSession:
    """A worker's view of one session; payloads are a pure function of (seed, step, retained).

    ``make()`` builds the next step (valid for the worker's retained positions) and ``apply()``
    advances the worker with the sidecar's answer, exactly as a worker updates its KV cache.
    """

    session_id: str
    config: dict[str, Any] = field(default_factory=lambda: dict(SMALL))
    seed: int = 0
    k_first: int = 12
    k: int = 3
    priors: bool = False  # also send the three query-agnostic priors
    call: str = "unspecified"  # the call kind every step carries
    ws: WorkerSession = field(init=False)
    retained: list[torch.Tensor] = field(init=False)
    next_pos: int = 0

    def __post_init__(self) -> None:
        self.cfg = PolicyConfig(**self.config).validate()
        self.ws = WorkerSession(self.session_id, groups=self.cfg.groups)
        self.retained = [torch.zeros(0, dtype=torch.int64) for _ in range(self.cfg.groups)]

    def make(self, k: int | None = None, step: int | None = None) -> Planned:
        """The next step's payload (``step`` overrides the step number only)."""
        number = self.ws.step + 1
        k = k if k is not None else (self.k_first if number == 1 else self.k)
        g = torch.Generator().manual_seed(self.seed * 100_003 + number)
        G, F = self.cfg.groups, self.cfg.fanout
        new = torch.arange(self.next_pos, self.next_pos + k, dtype=torch.int64)
        counts = [int(r.numel()) for r in self.retained]
        width = max(counts) + k
        attn = torch.zeros(G, width)
        last = torch.zeros(G, width)
        edge_pos = torch.full((G, k, F), -1, dtype=torch.int64)
        edge_w = torch.zeros(G, k, F)
        for gi in range(G):
            n = counts[gi] + k
            attn[gi, :n] = torch.rand(n, generator=g) ** 3 * k
            last[gi, :n] = torch.rand(n, generator=g) ** 3
            slots = torch.cat([self.retained[gi], new])
            for j in range(k):
                visible = slots[: counts[gi] + j + 1]
                f = min(F, visible.numel())
                pick = torch.randperm(visible.numel(), generator=g)[:f]
                w = torch.rand(f, generator=g)
                order = torch.argsort(w, descending=True)
                edge_pos[gi, j, :f] = visible[pick][order]
                edge_w[gi, j, :f] = w[order]
        priors: dict[str, torch.Tensor] = {}
        if self.priors:
            priors = {name: torch.zeros(G, width) for name in ("key_diversity", "key_norm", "value_norm")}
            for gi in range(G):
                n = counts[gi] + k
                priors["key_diversity"][gi, :n] = torch.rand(n, generator=g) * 2 - 1
                priors["key_norm"][gi, :n] = torch.rand(n, generator=g) * 20
                priors["value_norm"][gi, :n] = torch.rand(n, generator=g) * 3
        msg = pack_step(self.ws, new, attn, last, edge_pos, edge_w, step=step, call=self.call, **priors)
        return Planned(msg, StepInput(new, attn, last, edge_pos, edge_w, **priors, call=self.call), new)

    def apply(self, planned: Planned, result: pb.SessionResult) -> None:
        """Advance the worker: keep what the sidecar kept."""
        keep, _ = unpack_result(result)
        for gi in range(self.cfg.groups):
            slots = torch.cat([self.retained[gi], planned.new])
            self.retained[gi] = slots[keep[gi, : slots.numel()]]
        self.next_pos = int(planned.new[-1]) + 1
        self.ws.apply(result)


class Reference:
    """The in-process engine the service must agree with (same config, same inputs)."""

    def __init__(self) -> None:
        self.engine = Engine(torch.device("cpu"))
        self.handles: dict[str, int] = {}

    def open(self, sim: SimSession) -> None:
        self.handles[sim.session_id] = self.engine.open(sim.cfg)

    def step(self, sim: SimSession, planned: Planned) -> StepOutput:
        h = self.handles[sim.session_id]
        out = self.engine.step({h: planned.inp})[h]
        assert isinstance(out, StepOutput)
        return out


def assert_same_answer(result: pb.SessionResult, out: StepOutput, where: str = "") -> None:
    """The service's answer equals the engine's: same keep mask and evicted positions."""
    keep, evicted = unpack_result(result)
    assert torch.equal(keep, out.keep), f"{where}: keep mask differs from the in-process engine"
    assert [e.tolist() for e in evicted] == [e.tolist() for e in out.evicted], f"{where}: evictions differ"
    assert result.retained_count == sum(out.retained), where


async def drive(c: AsyncNexusClient, sims: list[SimSession], steps: int, ref: Reference | None = None
                ) -> list[list[pb.SessionResult]]:
    """``steps`` Step RPCs, each carrying one step of every session; checks against ``ref``."""
    history = []
    for _ in range(steps):
        plans = [s.make() for s in sims]
        results = await c.step([p.msg for p in plans])
        assert [r.session_id for r in results] == [s.session_id for s in sims]
        for s, p, r in zip(sims, plans, results, strict=True):
            if ref is not None:
                assert_same_answer(r, ref.step(s, p), f"{s.session_id} step {p.msg.step}")
            s.apply(p, r)
        history.append(results)
    return history


# -- a real Prometheus server --------------------------------------------------------------------
PROMETHEUS_HINT = "prometheus not found: install it (apt: prometheus, binary /usr/bin/prometheus)"


@dataclass
class PrometheusProc:
    """A running prometheus server; ``url`` is its HTTP API base."""

    proc: Any
    url: str
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[[int], PrometheusProc]]:
    """``start(port)`` runs a real prometheus scraping 127.0.0.1:port/metrics every second (job
    ``nexus``; ``job=`` another name, ``rules=`` a rule file evaluated every second); every started
    server is stopped at teardown. A missing binary FAILS the test."""
    import shutil
    import subprocess

    from nexus_sidecar.bench.procs import free_port, stop_process

    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(PROMETHEUS_HINT, pytrace=False)
    started: list[PrometheusProc] = []

    def start(scrape_port: int, *, job: str = "nexus", rules: Path | None = None) -> PrometheusProc:
        d = tmp_path / f"prom-{len(started)}"
        d.mkdir()
        (d / "prom.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            + (f"rule_files:\n  - {rules}\n" if rules is not None else "")
            + f"scrape_configs:\n  - job_name: {job}\n    scrape_interval: 1s\n    scrape_timeout: 900ms\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{scrape_port}']\n"
        )
        port = free_port()
        log = d / "prometheus.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [binary, f"--config.file={d / 'prom.yml'}", f"--storage.tsdb.path={d / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT)
        pp = PrometheusProc(proc, f"http://127.0.0.1:{port}", log)
        started.append(pp)
        return pp

    yield start
    for pp in started:
        stop_process(pp.proc, timeout=10)
