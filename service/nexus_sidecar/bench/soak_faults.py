"""``nexus-sidecar bench soak --faults``: the soak under faults, every answer checked.

Real processes on loopback: a redis-server with an append-only file (``appendfsync always``), and
one ``serve`` replica (two when a replica fault is asked for) with the Redis store and the soak's
tenants. Several tenants' workers step their sessions (``Step`` and ``StepBatch`` in turn, session
churn, idle pauses past ``idle_session_s`` so the reaper unloads and the next step resumes) while a
bad-request actor sends a refused request every ``bad_every_s`` and a fault cycle repeats:

- ``redis_pause``   Redis SIGSTOPped for ``pause_s`` (hung, not down: every call waits), then SIGCONT;
- ``redis_restart`` Redis SIGKILLed, restarted after ``down_s`` on its AOF on the same port;
- ``replica_kill``  replica 0 SIGKILLed, a new one started on its ports after ``down_s`` (its
  sessions resume from Redis; where the store is behind the worker, the worker resyncs);
- ``stale_replica`` the workers of replica 1 move to replica 0 (which takes their sessions over:
  a new owner epoch), then send one step to replica 1, which still holds their hot copies: it must
  refuse (ABORTED, fenced), never answer; then they move back and probe replica 0 the same way.

Every answer is compared with an uninterrupted in-process engine fed the same inputs. After a
resync the sidecar re-seeds the session from the worker's positions and its own older state; the
worker mirrors that exactly (``server.resync.reseed`` on its engine's snapshot at the step the
sidecar reports it was at), so answers after a resync are compared too; a resync the worker cannot
mirror is counted and that session's later answers are reported as not compared.

Recorded: calls by code, wrong answers, resyncs, sessions re-seeded from nothing, sessions lost
(streams abandoned), stale answers, each replica's RSS every second and its /metrics (what the
dashboard shows: degraded, store errors, fenced writes, CAS conflicts, resumes, resyncs, INTERNAL)
around every fault, and tracebacks in every replica's log.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import secrets
import statistics
import tempfile
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import torch
from nexus_client.client import AsyncNexusClient, ClientOptions
from nexus_client.columnar import BatchBuilder, read_answer
from nexus_client.errors import SidecarError
from nexus_client.packing import WorkerSession, pack_step, unpack_result
from prometheus_client.parser import text_string_to_metric_families

from nexus_sidecar.bench.procs import RedisServer, SidecarProc, free_port, start_sidecar, stop_process
from nexus_sidecar.bench.report import machine, markdown_table
from nexus_sidecar.engine import Engine, PolicyConfig, SessionState, StepInput, StepOutput
from nexus_sidecar.server.resync import reseed

FAULTS = ("redis_pause", "redis_restart", "replica_kill", "stale_replica")
_AT = {"redis_pause": 0.12, "redis_restart": 0.32, "replica_kill": 0.52, "stale_replica": 0.75}  # of a cycle
_RETRY = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED", "ABORTED"}
_RESYNC = {"FAILED_PRECONDITION", "NOT_FOUND"}
POLICIES = ("nexus", "h2o", "tova")
# /metrics series summed per replica for the fault table (the dashboard's view).
WATCH = {
    "degraded": ("nexus_degraded", {}),
    "store_errors": ("nexus_store_errors_total", {}),
    "fenced_writes": ("nexus_store_fenced_total", {}),
    "cas_other": ("nexus_store_cas_conflicts_total", {"writer": "other"}),
    "cas_self": ("nexus_store_cas_conflicts_total", {"writer": "self"}),
    "resumed": ("nexus_sessions_resumed_total", {}),
    "resynced": ("nexus_sessions_resynced_total", {}),
    "expired": ("nexus_sessions_expired_total", {}),
    "sessions_fenced": ("nexus_sessions_fenced_total", {}),
    "internal": ("nexus_requests_total", {"code": "INTERNAL"}),
    "maintenance_errors": ("nexus_maintenance_errors_total", {}),
}


@dataclass
class FaultSoakSettings:
    """What the fault soak runs (the defaults: the 10-minute run of docs/operations-soak.md)."""

    duration_s: float = 600.0
    faults: tuple[str, ...] = FAULTS
    cycle_s: float = 150.0  # the fault cycle repeats about this often (at least once)
    tenants: int = 3
    workers_per_tenant: int = 2
    sessions: int = 3  # per worker, stepped together in one RPC
    groups: int = 2
    prefill: int = 48
    stream: int = 60  # decode calls before a worker closes its sessions and opens new ones
    pause_s: float = 3.0  # redis_pause
    down_s: float = 2.0  # redis_restart, replica_kill
    idle_every: int = 40  # a worker idles past idle_session_s after every Nth call (0: never)
    idle_session_s: float = 8.0
    bad_every_s: float = 2.0  # the bad-request actor (0: off)
    window_s: float = 30.0
    warmup_frac: float = 0.2  # RSS drift is measured from the end of this share of the run
    ports: list[tuple[int, int]] | None = None  # per replica (gRPC, HTTP); default: free ports
    serve_args: tuple[str, ...] = ()  # extra `serve` flags

    @property
    def replicas(self) -> int:
        return 2 if {"replica_kill", "stale_replica"} & set(self.faults) else 1

    def validate(self) -> FaultSoakSettings:
        unknown = sorted(set(self.faults) - set(FAULTS))
        if unknown:
            raise ValueError(f"faults: unknown {unknown}, expected a subset of {list(FAULTS)}")
        if self.duration_s <= 0 or self.cycle_s <= 0:
            raise ValueError("duration_s and cycle_s must be > 0")
        return self


@dataclass
class _Call:
    t: float  # seconds since the start
    seconds: float
    code: str
    rpc: str


@dataclass
class Ledger:
    """Everything the workers saw."""

    calls: list[_Call] = field(default_factory=list)
    compared: int = 0  # session answers compared with the engine
    wrong: int = 0  # ... that differed
    uncompared: int = 0  # answers of sessions whose resync could not be mirrored
    resyncs: int = 0
    resyncs_unmirrored: int = 0
    reseeded_from_nothing: int = 0  # NOT_FOUND: the sidecar had no state, the worker re-seeded it
    lost: int = 0  # streams abandoned (the worker could not continue its sessions)
    stale_refused: int = 0  # steps sent to the replica that lost the sessions: ABORTED (fenced)
    stale_answered: int = 0  # ... answered instead (must stay 0)
    stale_other: collections.Counter[str] = field(default_factory=collections.Counter)
    bad_expected: int = 0
    bad_unexpected: collections.Counter[str] = field(default_factory=collections.Counter)
    unexpected: collections.Counter[str] = field(default_factory=collections.Counter)
    first_wrong: str = ""


class Cluster:
    """The soak's processes: Redis and the replicas, with the faults that act on them."""

    def __init__(self, s: FaultSoakSettings, work: Path, keys_file: Path) -> None:
        self.s, self.work = s, work
        self.redis = RedisServer(work / "redis")
        self.ports = s.ports or [(free_port(), free_port()) for _ in range(s.replicas)]
        self.args = ("--device", "cpu", "--torch-threads", "1", "--keys-file", str(keys_file), "--store",
                     self.redis.url, "--max-delay-us", "300", "--idle-session-s", str(s.idle_session_s),
                     "--maintenance-period-s", "1", *s.serve_args)
        self.logs = [work / f"replica-{i}.log" for i in range(len(self.ports))]
        self.replicas: list[SidecarProc | None] = [None] * len(self.ports)
        self.started_at = [0.0] * len(self.ports)
        for i in range(len(self.ports)):
            self.start_replica(i)

    def target(self, i: int) -> str:
        return f"127.0.0.1:{self.ports[i][0]}"

    def start_replica(self, i: int) -> None:
        self.replicas[i] = start_sidecar(*self.args, ports=self.ports[i], log_path=self.logs[i])
        self.started_at[i] = time.monotonic()

    def kill_replica(self, i: int) -> None:
        rp = self.replicas[i]
        if rp is not None:
            rp.proc.kill()
            rp.proc.wait(timeout=10)
        self.replicas[i] = None

    def stop(self) -> None:
        for rp in self.replicas:
            if rp is not None:
                stop_process(rp.proc, timeout=30)
        self.redis.stop()

    def tracebacks(self) -> int:
        return sum(p.read_text(errors="replace").count("Traceback") for p in self.logs if p.exists())


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class CheckedWorker:
    """One worker: its sessions on the sidecar, mirrored by an in-process engine."""

    def __init__(self, name: str, key: str, cluster: Cluster, route: int, s: FaultSoakSettings, ledger: Ledger,
                 t0: float) -> None:
        self.name, self.key, self.cluster, self.route, self.s, self.ledger, self.t0 = name, key, cluster, route, s, \
            ledger, t0
        self.clients = [AsyncNexusClient(ClientOptions(cluster.target(i), api_key=key, timeout_s=10.0, retries=0))
                        for i in range(len(cluster.ports))]
        seed = zlib.crc32(name.encode())
        self.g = torch.Generator().manual_seed(seed)
        self.config = {"policy": POLICIES[seed % len(POLICIES)], "budget": 40, "fanout": 4, "groups": s.groups,
                       "sinks": 2, "recent": 4, "seed": seed % 1000}
        self.cfg = PolicyConfig(**self.config).validate()
        self.engine = Engine(torch.device("cpu"))
        self.probe: int | None = None  # a replica to send the next step to, which must refuse it
        self.answered_by = route  # the replica that answered the last step
        self.move_to: int | None = None  # asked by the stale_replica fault; done at a call boundary
        self.just_idled = False
        self.calls = 0
        self.stagger = seed % max(1, s.idle_every)  # workers do not all pause at once

    async def close(self) -> None:
        for c in self.clients:
            await c.close()

    # -- one stream of sessions -----------------------------------------------------------------
    async def run(self, end: float) -> None:
        generation = 0
        while time.monotonic() < end:
            ids = [f"{self.name}-g{generation}-s{i}" for i in range(self.s.sessions)]
            generation += 1
            await self._stream(ids, end)

    async def _stream(self, ids: list[str], end: float) -> None:
        for sid in ids:
            if not await self._until_ok(lambda sid=sid: self._client().open_session(sid, self.config), end):
                return
        wss = [WorkerSession(sid, groups=self.s.groups) for sid in ids]
        handles = [self.engine.open(self.cfg) for _ in ids]
        snaps: list[dict[int, SessionState]] = [{0: self.engine.snapshot(h)} for h in handles]
        mirrored = [True] * len(ids)
        nxt = 0
        try:
            for call in range(self.s.stream + 1):
                if time.monotonic() >= end:
                    break
                k = self.s.prefill if call == 0 else 1
                new = torch.arange(nxt, nxt + k)
                nxt += k
                # A move waits for a step answered after any idle pause: the replica left behind must
                # hold the sessions hot (the reaper unloads them during a pause), or it is not stale.
                if self.move_to is not None and not self.just_idled and self.answered_by == self.route:
                    self.probe, self.route, self.move_to = self.route, self.move_to, None
                inputs = [self._inputs(ws, new) for ws in wss]
                ok = await self._step(wss, handles, snaps, mirrored, inputs, new, end,
                                      "Step" if call % 2 == 0 else "StepBatch")
                if not ok:
                    if time.monotonic() < end:
                        self.ledger.lost += 1
                    return
                if self.probe is not None and self.answered_by != self.probe:  # the new owner answered
                    await self._probe(wss, nxt)
                self.calls += 1
                self.just_idled = False
                pending = self.move_to is not None or self.probe is not None  # no pause in a move
                if self.s.idle_every and (self.calls + self.stagger) % self.s.idle_every == 0 and not pending:
                    await asyncio.sleep(self.s.idle_session_s + 2.5)  # the reaper unloads them; the next step resumes
                    self.just_idled = True
            for sid in ids:
                await self._until_ok(lambda sid=sid: self._client().close_session(sid), end + 30)
        finally:
            for h in handles:
                self.engine.close(h)

    def _client(self) -> AsyncNexusClient:
        return self.clients[self.route]

    def _inputs(self, ws: WorkerSession, new: torch.Tensor) -> StepInput:
        G, F, k = self.s.groups, self.cfg.fanout, new.numel()
        width = max((p.numel() for p in ws.positions), default=0) + k
        attn = torch.rand(G, width, generator=self.g) ** 3 * k
        last = torch.rand(G, width, generator=self.g) ** 3
        # Edges to the token itself and the F - 1 before it: the recent window keeps those cached.
        edge_pos = (new.view(1, k, 1) - torch.arange(F).view(1, 1, F)).clamp(min=0).expand(G, k, F).clone()
        edge_w = torch.rand(G, k, F, generator=self.g)
        return StepInput(new, attn, last, edge_pos, edge_w)

    async def _until_ok(self, fn: Any, end: float) -> bool:
        """Call ``fn`` until it succeeds, retrying what a fault causes; False when time ran out or
        the error is not one a fault explains."""
        while True:
            start = time.monotonic()
            try:
                await fn()
                return True
            except SidecarError as exc:
                self._record(start, exc.code.name, "other")
                if exc.code.name not in _RETRY or time.monotonic() > end:
                    if exc.code.name not in _RETRY:
                        self.ledger.unexpected[exc.code.name] += 1
                    return False
            await asyncio.sleep(0.2)

    def _record(self, start: float, code: str, rpc: str) -> None:
        self.ledger.calls.append(_Call(start - self.t0, time.monotonic() - start, code, rpc))

    async def _step(self, wss: list[WorkerSession], handles: list[int], snaps: list[dict[int, SessionState]],
                    mirrored: list[bool], inputs: list[StepInput], new: torch.Tensor, end: float, rpc: str) -> bool:
        """One step of every session, retried through faults (resyncing where the sidecar is behind);
        the answers compared with the engine's."""
        while True:
            start, route = time.monotonic(), self.route
            try:
                keeps = await self._send(self.clients[route], wss, inputs, rpc)
            except SidecarError as exc:
                code = exc.code.name
                self._record(start, code, rpc)
                if time.monotonic() > end + 30:
                    return False
                if code in _RESYNC:
                    if not await self._resync(wss, handles, snaps, mirrored, code == "NOT_FOUND", end):
                        return False
                    continue
                if code in _RETRY:
                    await asyncio.sleep(0.2)
                    continue
                self.ledger.unexpected[code] += 1
                return False
            self._record(start, "OK", rpc)
            self.answered_by = route
            for i, (ws, keep) in enumerate(zip(wss, keeps, strict=True)):
                out = self.engine.step({handles[i]: inputs[i]})[handles[i]]
                assert isinstance(out, StepOutput)
                if mirrored[i]:
                    self.ledger.compared += 1
                    if not torch.equal(keep, out.keep):
                        self.ledger.wrong += 1
                        self.ledger.first_wrong = self.ledger.first_wrong or f"{ws.session_id} step {ws.step + 1}"
                else:
                    self.ledger.uncompared += 1
                # The worker follows the sidecar's answer (it evicts what the sidecar says).
                ws.track(keep, new)
                ws.step += 1
                snaps[i][ws.step] = self.engine.snapshot(handles[i])
            return True

    async def _send(self, client: AsyncNexusClient, wss: list[WorkerSession], inputs: list[StepInput], rpc: str
                    ) -> list[torch.Tensor]:
        """One RPC with a step of every session; returns the keep masks (and sets each ws's count/checksum)."""
        if rpc == "Step":
            msgs = [pack_step(ws, i.new_positions, i.attn, i.last, i.edge_pos, i.edge_w)
                    for ws, i in zip(wss, inputs, strict=True)]
            results = await client.step(msgs)
            for ws, r in zip(wss, results, strict=True):
                ws.retained_count, ws.retained_checksum = r.retained_count, r.retained_checksum
            return [unpack_result(r)[0] for r in results]
        batch = BatchBuilder(torch.float32)
        for ws, i in zip(wss, inputs, strict=True):
            batch.add(ws, i.new_positions, i.attn, i.last, i.edge_pos, i.edge_w)
        req = batch.request()
        answer = read_answer(await client.step_batch(req), req, [ws.groups for ws in wss])
        for b, ws in enumerate(wss):
            ws.retained_count = int(answer.retained_counts[b])
            ws.retained_checksum = int(answer.retained_checksums[b])
        return [answer.keep_of(b) for b in range(len(wss))]

    async def _resync(self, wss: list[WorkerSession], handles: list[int], snaps: list[dict[int, SessionState]],
                      mirrored: list[bool], not_found: bool, end: float) -> bool:
        """Re-seed every session of the RPC from the worker's truth, and the engine the same way."""
        for i, ws in enumerate(wss):
            counts = (ws.retained_count, ws.retained_checksum)
            while True:
                start = time.monotonic()
                try:
                    resp = await self._client().resync(ws, self.config)
                    self._record(start, "OK", "Resync")
                    break
                except SidecarError as exc:
                    self._record(start, exc.code.name, "Resync")
                    if exc.code.name not in _RETRY or time.monotonic() > end + 30:
                        self.ledger.unexpected[exc.code.name] += 1
                        return False
                    await asyncio.sleep(0.2)
            ws.retained_count, ws.retained_checksum = counts  # the worker's truth did not change
            self.ledger.resyncs += 1
            before = int(resp.previous_step)
            if not_found and before == 0 and ws.step > 0:
                self.ledger.reseeded_from_nothing += 1
            # What the sidecar did: reseed(config, its state at `before`, our positions, our step).
            prior = snaps[i].get(before)
            if before == 0 and not_found:
                prior = None
            elif prior is None:
                mirrored[i] = False
                self.ledger.resyncs_unmirrored += 1
            positions = ws.positions or [torch.zeros(0, dtype=torch.int64)] * ws.groups
            seeded = reseed(self.cfg, prior, positions, ws.step).state
            self.engine.close(handles[i])
            handles[i] = self.engine.restore(seeded)
            snaps[i][ws.step] = self.engine.snapshot(handles[i])
        return True

    async def _probe(self, wss: list[WorkerSession], nxt: int) -> None:
        """Send the next step to the replica that lost these sessions: it must refuse (fenced)."""
        target, self.probe = self.probe, None
        if target is None or self.cluster.replicas[target] is None:
            return
        probe_new = torch.arange(nxt, nxt + 1)
        inputs = [self._inputs(ws, probe_new) for ws in wss]
        saved = [(ws.retained_count, ws.retained_checksum) for ws in wss]
        start = time.monotonic()
        try:
            await self._send(self.clients[target], wss, inputs, "Step")
            self.ledger.stale_answered += 1
            self._record(start, "OK", "probe")
        except SidecarError as exc:
            self._record(start, exc.code.name, "probe")
            if exc.code == grpc.StatusCode.ABORTED:
                self.ledger.stale_refused += 1
            else:
                self.ledger.stale_other[exc.code.name] += 1
        for ws, (count, checksum) in zip(wss, saved, strict=True):
            ws.retained_count, ws.retained_checksum = count, checksum


async def _bad_requests(cluster: Cluster, keys: dict[str, str], s: FaultSoakSettings, ledger: Ledger,
                        end: float) -> None:
    """A refused request every ``bad_every_s``: malformed, unknown session, bad key, out of order."""
    tenant, key = next(iter(keys.items()))
    good = AsyncNexusClient(ClientOptions(cluster.target(0), api_key=key, timeout_s=5.0, retries=0))
    bad = AsyncNexusClient(ClientOptions(cluster.target(0), api_key="not-a-key-" + "x" * 20, timeout_s=5.0,
                                         retries=0))
    ws = WorkerSession(f"bad-actor-{tenant}", groups=1)
    kinds = ("out_of_order", "malformed", "unknown", "bad_key")
    expected = {"malformed": {"INVALID_ARGUMENT"}, "unknown": {"NOT_FOUND"}, "bad_key": {"UNAUTHENTICATED"},
                "out_of_order": {"FAILED_PRECONDITION", "NOT_FOUND"}}
    n = 0
    try:
        while time.monotonic() < end:
            await asyncio.sleep(s.bad_every_s)
            kind = kinds[n % len(kinds)]
            n += 1
            one = torch.arange(0, 1)
            try:
                if kind == "malformed":  # one session twice in a request: refused before any lookup
                    msg = pack_step(ws, one, torch.ones(1, 1), torch.ones(1, 1),
                                    torch.zeros(1, 1, 8, dtype=torch.int64), torch.zeros(1, 1, 8))
                    await good.step([msg, msg])
                elif kind == "unknown":
                    await good.step([pack_step(WorkerSession(f"never-opened-{n}", groups=1), one, torch.ones(1, 1),
                                               torch.ones(1, 1), torch.zeros(1, 1, 8, dtype=torch.int64),
                                               torch.zeros(1, 1, 8))])
                elif kind == "bad_key":
                    await bad.list_policies()
                else:
                    await good.open_session(ws.session_id, {"policy": "nexus", "budget": 32, "sinks": 2, "recent": 4,
                                                            "fanout": 8})
                    await good.step([pack_step(ws, one, torch.ones(1, 1), torch.ones(1, 1),
                                               torch.zeros(1, 1, 8, dtype=torch.int64), torch.zeros(1, 1, 8), step=7)])
                ledger.bad_unexpected["OK"] += 1
            except SidecarError as exc:
                if exc.code.name in expected[kind]:
                    ledger.bad_expected += 1
                elif exc.code.name not in _RETRY:  # a fault in progress explains UNAVAILABLE & co
                    ledger.bad_unexpected[exc.code.name] += 1
    finally:
        await good.close()
        await bad.close()


def _watch(text: str) -> dict[str, float]:
    out = dict.fromkeys(WATCH, 0.0)
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            for name, (metric, labels) in WATCH.items():
                if sample.name == metric and all(sample.labels.get(k) == v for k, v in labels.items()):
                    out[name] += sample.value
    return out


def _sampler(cluster: Cluster, t0: float, stop: threading.Event, rss: list[tuple[float, int, float]],
             metrics: list[tuple[float, int, dict[str, float]]], progress: bool, ledger: Ledger) -> None:
    """Every second: each live replica's RSS and /metrics. A thread of its own, so that the workers'
    engine work on the event loop cannot delay the samples (the fault table reads them)."""
    with httpx.Client(timeout=2.0) as http:
        last_print = 0.0
        while not stop.wait(1.0):
            now = time.monotonic() - t0
            for i, rp in enumerate(list(cluster.replicas)):
                if rp is None:
                    continue
                rss.append((now, i, _rss_mb(rp.proc.pid)))
                with contextlib.suppress(httpx.HTTPError):  # a replica being killed, or slow
                    metrics.append((now, i, _watch(http.get(f"http://127.0.0.1:{rp.http_port}/metrics").text)))
            if progress and now - last_print >= 15:
                last_print = now
                print(f"  fault soak {now:5.0f}s  calls {len(ledger.calls)}  compared {ledger.compared}  "
                      f"wrong {ledger.wrong}  resyncs {ledger.resyncs}", flush=True)


async def _faults(cluster: Cluster, workers: list[CheckedWorker], s: FaultSoakSettings, t0: float, end: float,
                  log: list[dict[str, Any]]) -> None:
    cycles = max(1, round(s.duration_s / s.cycle_s))
    length = s.duration_s / cycles
    plan = sorted((c * length + _AT[name] * length, name) for c in range(cycles) for name in s.faults)
    for at, name in plan:
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        if time.monotonic() >= end:
            return
        start = time.monotonic() - t0
        if name == "redis_pause":
            cluster.redis.pause()
            await asyncio.sleep(s.pause_s)
            cluster.redis.resume()
        elif name == "redis_restart":
            cluster.redis.kill()
            await asyncio.sleep(s.down_s)
            await asyncio.to_thread(cluster.redis.start)
        elif name == "replica_kill":
            cluster.kill_replica(0)
            await asyncio.sleep(s.down_s)
            await asyncio.to_thread(cluster.start_replica, 0)
        else:  # stale_replica: replica 1's workers move to 0 and probe 1; then back, probing 0
            moved = [w for w in workers if w.route == 1]
            for there in (0, 1):
                for w in moved:
                    w.move_to = there
                await _settled(moved, end + 10)
                await asyncio.sleep(2.0)
        log.append({"fault": name, "start_s": start, "end_s": time.monotonic() - t0})


async def _settled(workers: list[CheckedWorker], until: float) -> None:
    """Wait until every worker made its move and sent its probe (or time ran out)."""
    while any(w.move_to is not None or w.probe is not None for w in workers) and time.monotonic() < until:
        await asyncio.sleep(0.2)


def _window_view(metrics: list[tuple[float, int, dict[str, float]]], lo: float, hi: float) -> dict[str, float]:
    """Per watched series: the max (degraded) or the increase (counters) over [lo, hi], summed over
    replicas (a restarted replica's counters start again from 0)."""
    view = dict.fromkeys(WATCH, 0.0)
    for i in {r for _, r, _ in metrics}:
        before = [m for t, r, m in metrics if r == i and t < lo]
        inside = [m for t, r, m in metrics if r == i and lo <= t <= hi]
        if not inside:
            continue
        for name in WATCH:
            if name == "degraded":
                view[name] = max(view[name], max(m[name] for m in inside))
                continue
            base = before[-1][name] if before else 0.0
            last = inside[-1][name]
            view[name] += last - base if last >= base else last
    return view


def _p99(values: list[float]) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(0.99 * len(v)))] * 1e3 if v else float("nan")


async def _drive(cluster: Cluster, keys: dict[str, str], s: FaultSoakSettings, progress: bool) -> dict[str, Any]:
    ledger = Ledger()
    t0 = time.monotonic()
    end = t0 + s.duration_s
    workers = [CheckedWorker(f"{t}-w{w}", key, cluster, (ti * s.workers_per_tenant + w) % len(cluster.ports), s,
                             ledger, t0)
               for ti, (t, key) in enumerate(keys.items()) for w in range(s.workers_per_tenant)]
    rss: list[tuple[float, int, float]] = []
    metrics: list[tuple[float, int, dict[str, float]]] = []
    log: list[dict[str, Any]] = []
    tasks = [_faults(cluster, workers, s, t0, end, log), *(w.run(end) for w in workers)]
    if s.bad_every_s:
        tasks.append(_bad_requests(cluster, keys, s, ledger, end))
    stop = threading.Event()
    sampler = threading.Thread(target=_sampler, args=(cluster, t0, stop, rss, metrics, progress, ledger), daemon=True)
    sampler.start()
    try:
        await asyncio.gather(*tasks)
    finally:
        stop.set()
        sampler.join(timeout=10)
        for w in workers:
            await w.close()
    ok = [c for c in ledger.calls if c.code == "OK" and c.rpc in ("Step", "StepBatch")]
    steady = [c.seconds for c in ok if not any(f["start_s"] - 1 <= c.t <= f["end_s"] + 5 for f in log)]
    faults = []
    for f in log:
        lo, hi = f["start_s"], f["end_s"] + 5.0
        inside = [c for c in ledger.calls if lo <= c.t <= hi]
        codes = collections.Counter(c.code for c in inside)
        faults.append({**f, "p99_ms": _p99([c.seconds for c in inside if c.code == "OK" and c.rpc in
                                             ("Step", "StepBatch")]),
                       "calls": len(inside), "codes": dict(codes), **_window_view(metrics, lo, hi)})
    rss_by: dict[str, dict[str, float]] = {}
    for i in range(len(cluster.ports)):
        # From the warm-up end, or from the replica's last restart plus the same warm-up.
        since = max(s.warmup_frac * s.duration_s, cluster.started_at[i] - t0 + s.warmup_frac * s.cycle_s)
        series = [m for t, r, m in rss if r == i and t >= since]
        if len(series) >= 2:
            rss_by[f"replica{i}"] = {"from_s": since, "start_mb": series[0], "end_mb": series[-1],
                                     "max_mb": max(series), "drift": (series[-1] - series[0]) / series[0]}
    codes = collections.Counter(c.code for c in ledger.calls)
    return {
        "settings": asdict(s), "machine": machine(), "faults": faults,
        "calls": len(ledger.calls), "codes": dict(codes),
        "internal": codes.get("INTERNAL", 0) + ledger.bad_unexpected.get("INTERNAL", 0),
        "answers_compared": ledger.compared, "wrong_answers": ledger.wrong, "first_wrong": ledger.first_wrong,
        "answers_not_compared": ledger.uncompared, "resyncs": ledger.resyncs,
        "resyncs_unmirrored": ledger.resyncs_unmirrored, "reseeded_from_nothing": ledger.reseeded_from_nothing,
        "sessions_lost": ledger.lost, "stale_refused": ledger.stale_refused, "stale_answered": ledger.stale_answered,
        "stale_other": dict(ledger.stale_other), "bad_expected": ledger.bad_expected,
        "bad_unexpected": dict(ledger.bad_unexpected), "unexpected": dict(ledger.unexpected),
        "dashboard_run": _window_view(metrics, 0.0, float("inf")),  # the /metrics increases over the whole run
        "steady_p50_ms": statistics.median(steady) * 1e3 if steady else float("nan"),
        "steady_p99_ms": _p99(steady), "rss": rss_by,
    }


def run(s: FaultSoakSettings, progress: bool = True, work_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the fault soak (see the module docstring); returns the payload. ``work_dir`` keeps the
    processes' logs and Redis files (default: a temporary directory)."""
    s.validate()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work_dir or tmp)
        (work / "redis").mkdir(parents=True, exist_ok=True)
        keys = {f"tenant{i}": secrets.token_urlsafe(24) for i in range(s.tenants)}
        keys_file = work / "keys"
        keys_file.write_text("".join(f"{t} {k} rw\n" for t, k in keys.items()))
        cluster = Cluster(s, work, keys_file)
        try:
            payload = asyncio.run(_drive(cluster, keys, s, progress))
        finally:
            cluster.stop()
        payload["tracebacks_in_logs"] = cluster.tracebacks()
    return payload


def table(payload: dict[str, Any]) -> str:
    """One row per fault (what the workers and the dashboard saw), then the totals."""
    rows = [{"t_s": round(f["start_s"]), "fault": f["fault"], "lasted_s": round(f["end_s"] - f["start_s"], 1),
             "p99_ms": f["p99_ms"], "errors": sum(v for k, v in f["codes"].items() if k != "OK"),
             "degraded": f["degraded"], "store_errors": f["store_errors"], "fenced": f["fenced_writes"],
             "cas_self": f["cas_self"], "cas_other": f["cas_other"], "resumed": f["resumed"],
             "resynced": f["resynced"]} for f in payload["faults"]]
    head = markdown_table(rows, ["t_s", "fault", "lasted_s", "p99_ms", "errors", "degraded", "store_errors", "fenced",
                                 "cas_self", "cas_other", "resumed", "resynced"]) if rows else "(no fault injected)"
    s = payload["settings"]
    rss = "; ".join(f"{k} {v['start_mb']:.0f} -> {v['end_mb']:.0f} MiB ({v['drift'] * 100:+.1f} %, from "
                    f"{v['from_s']:.0f} s)" for k, v in payload["rss"].items())
    return (f"{head}\n\n{s['tenants']} tenants x {s['workers_per_tenant']} workers x {s['sessions']} sessions, "
            f"{s['duration_s']:.0f} s, {len(payload['faults'])} faults: {payload['calls']} calls, codes "
            f"{payload['codes']}; answers compared {payload['answers_compared']}, wrong {payload['wrong_answers']}, "
            f"not compared {payload['answers_not_compared']}; resyncs {payload['resyncs']} (unmirrored "
            f"{payload['resyncs_unmirrored']}, re-seeded from nothing {payload['reseeded_from_nothing']}); sessions "
            f"lost {payload['sessions_lost']}; INTERNAL {payload['internal']}; stale replica: refused "
            f"{payload['stale_refused']}, answered {payload['stale_answered']}; bad requests refused as expected "
            f"{payload['bad_expected']}, otherwise {payload['bad_unexpected']}; unexpected {payload['unexpected']}; "
            f"steady p50/p99 {payload['steady_p50_ms']:.1f}/{payload['steady_p99_ms']:.1f} ms; RSS {rss}; "
            f"tracebacks in the logs {payload['tracebacks_in_logs']}")
