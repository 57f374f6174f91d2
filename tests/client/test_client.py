"""``NexusClient`` / ``AsyncNexusClient`` against real sidecars (no mocks).

Each sidecar here is the real server (``nexus_sidecar.server.app.Sidecar``: gRPC, batcher, engine,
memory store) running in this process on its own event loop thread, on loopback ports chosen by
the OS (or on a unix socket). In-process keeps the start-up cheap (the engine is imported once) and
lets a test look at the batcher's queue to time a request exactly; the wire path is the same as a
subprocess's. Every sidecar is stopped at teardown.

Retries are checked by wrapping the client's stub methods: every attempt's step number and status
code are recorded, so "retried with the same step number" is observed, not inferred.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from nexus_client.client import AsyncNexusClient, ClientOptions, NexusClient
from nexus_client.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    SessionNotFound,
    SidecarError,
    Unauthenticated,
    Unavailable,
)
from nexus_client.packing import WorkerSession, pack_step, unpack_result
from nexus_client.v1 import sidecar_pb2 as pb
from nexus_sidecar.bench.procs import free_port
from nexus_sidecar.server.app import Sidecar
from nexus_sidecar.server.settings import ServerSettings

RW_KEY = "rw-key-0123456789abcdef"
RO_KEY = "ro-key-0123456789abcdef"
CFG: dict[str, Any] = {"policy": "nexus", "budget": 6, "slack": 0, "sinks": 1, "recent": 2, "fanout": 3, "seed": 11}
FANOUT = 3


class InProcessSidecar:
    """A real ``Sidecar`` served from a private event loop on a background thread."""

    def __init__(self, **settings: Any) -> None:
        base = {"grpc_host": "127.0.0.1", "grpc_port": 0, "http_host": "127.0.0.1", "http_port": 0, "device": "cpu",
                "shutdown_grace_s": 1.0}
        self.settings = ServerSettings(**{**base, **settings})
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sidecar-loop", daemon=True)
        self.sidecar: Sidecar | None = None

    def start(self, timeout: float = 60.0) -> InProcessSidecar:
        """Bind and wait until the sidecar serves."""
        self.thread.start()

        async def make() -> Sidecar:
            sc = Sidecar(self.settings)
            await sc.start()
            return sc

        self.sidecar = asyncio.run_coroutine_threadsafe(make(), self.loop).result(timeout)
        return self

    @property
    def target(self) -> str:
        """``127.0.0.1:port`` of the gRPC listener."""
        assert self.sidecar is not None
        return f"127.0.0.1:{self.sidecar.grpc_port}"

    def pending(self) -> int:
        """Steps waiting in the micro-batcher right now."""
        assert self.sidecar is not None
        return self.sidecar.sessions.batcher.pending

    def stop(self) -> None:
        """Drain, stop both servers, end the loop thread."""
        if self.sidecar is not None:
            asyncio.run_coroutine_threadsafe(self.sidecar.stop(grace=1.0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def running_sidecar(**settings: Any) -> Iterator[InProcessSidecar]:
    """Start an :class:`InProcessSidecar` with these settings; always stopped."""
    sc = InProcessSidecar(**settings)
    try:
        yield sc.start()
    finally:
        sc.stop()


@pytest.fixture(scope="module")
def keyed() -> Iterator[tuple[InProcessSidecar, str]]:
    """A sidecar with a keys file (one rw, one ro key) that also listens on a unix socket."""
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="nxc-") as d:  # short path: sun_path is 108 bytes
        keys = Path(d) / "keys"
        keys.write_text(f"acme {RW_KEY} rw\nacme {RO_KEY} ro\n")
        sock = f"{d}/x.sock"
        with running_sidecar(keys_file=keys, uds=sock) as sc:
            yield sc, f"unix:{sock}"


@pytest.fixture(scope="module")
def slow_queue() -> Iterator[InProcessSidecar]:
    """A sidecar whose queue holds ONE step and whose batcher waits 1 s for a batch to fill."""
    with running_sidecar(queue_size=1, max_delay_us=1_000_000, max_batch=64) as sc:
        yield sc


class Tokens:
    """A fake worker's side of one session: deterministic summaries for the next ``k`` tokens."""

    def __init__(self, ws: WorkerSession, seed: int = 0) -> None:
        self.ws = ws
        self.next_pos = 0
        self.gen = torch.Generator().manual_seed(seed)

    def step(self, k: int, *, step: int | None = None) -> pb.SessionStep:
        """The ``SessionStep`` for ``k`` new tokens after what the session retains."""
        n = self.ws.retained_count  # one group: slots == retained count
        width = n + k
        attn = torch.rand((1, width), generator=self.gen)
        last = torch.rand((1, width), generator=self.gen)
        pos = torch.arange(self.next_pos, self.next_pos + k)
        edge_pos = torch.full((1, k, FANOUT), -1, dtype=torch.int64)
        edge_w = torch.zeros((1, k, FANOUT))
        if self.next_pos:
            edge_pos[0, :, 0] = self.next_pos - 1
            edge_w[0, :, 0] = 0.5
        return pack_step(self.ws, pos, attn, last, edge_pos, edge_w, step=step)

    def commit(self, result: pb.SessionResult, k: int) -> None:
        """Advance after the sidecar answered a ``k``-token step."""
        self.ws.apply(result)
        self.next_pos += k


def record_attempts(client: NexusClient | AsyncNexusClient, rpc: str) -> list[tuple[int | None, str]]:
    """Wrap ``client``'s stub method ``rpc``: every attempt appends (step number or None, status code name)."""
    attempts: list[tuple[int | None, str]] = []
    inner = getattr(client._stub, rpc)
    is_async = isinstance(client, AsyncNexusClient)

    def step_of(request: Any) -> int | None:
        return request.steps[0].step if isinstance(request, pb.StepRequest) else None

    if is_async:
        async def wrapped_async(request: Any, **kw: Any) -> Any:
            try:
                out = await inner(request, **kw)
            except grpc.RpcError as err:
                attempts.append((step_of(request), err.code().name))
                raise
            attempts.append((step_of(request), "OK"))
            return out

        setattr(client._stub, rpc, wrapped_async)
    else:
        def wrapped(request: Any, **kw: Any) -> Any:
            try:
                out = inner(request, **kw)
            except grpc.RpcError as err:
                attempts.append((step_of(request), err.code().name))
                raise
            attempts.append((step_of(request), "OK"))
            return out

        setattr(client._stub, rpc, wrapped)
    return attempts


def same_answer(a: pb.SessionResult, b: pb.SessionResult) -> bool:
    """Equal decisions (ignoring the session id)."""
    ka, ea = unpack_result(a)
    kb, eb = unpack_result(b)
    return (a.step == b.step and torch.equal(ka, kb) and len(ea) == len(eb)
            and all(torch.equal(x, y) for x, y in zip(ea, eb, strict=True))
            and a.retained_count == b.retained_count and a.retained_checksum == b.retained_checksum)


def _sid(name: str) -> str:
    return f"{name}-{time.monotonic_ns()}"


# -- sync client ------------------------------------------------------------------------------


def test_sync_open_step_get_list_close(keyed: tuple[InProcessSidecar, str]) -> None:
    sc, _ = keyed
    with NexusClient(sc.target, api_key=RW_KEY) as client:
        names = {p.name for p in client.list_policies()}
        assert {"nexus", "h2o", "streaming"} <= names
        sid = _sid("sync")
        opened = client.open_session(sid, CFG)
        assert opened.step == 0 and opened.config.budget == 6 and opened.config.groups == 1
        assert client.open_session(sid, CFG).step == 0  # idempotent for the same config
        tok = Tokens(WorkerSession(sid, groups=1))
        evicted = 0
        for i, k in enumerate([4, 3, 2, 1], start=1):
            (res,) = client.step([tok.step(k)])
            assert res.session_id == sid and res.step == i
            keep, ev = unpack_result(res)
            assert keep.shape == (1, tok.ws.retained_count + k)
            evicted += int(ev[0].numel())
            tok.commit(res, k)
            assert res.retained_count <= CFG["budget"]
        assert evicted == 10 - CFG["budget"]
        snap = client.get_session(sid, include_weights=True)
        assert snap.step == 4 and snap.retained_count == tok.ws.retained_count
        assert snap.retained_checksum == tok.ws.retained_checksum
        assert snap.tokens_seen == 10 and snap.tokens_evicted == evicted
        assert list(snap.groups[0].positions.shape) == [CFG["budget"]]
        assert client.close_session(sid) == 4
        with pytest.raises(SessionNotFound, match=sid):
            client.get_session(sid)


def test_sync_typed_errors_are_not_retried(keyed: tuple[InProcessSidecar, str]) -> None:
    sc, _ = keyed
    with NexusClient(ClientOptions(sc.target, api_key=RW_KEY, retries=3, backoff_s=0.01)) as client:
        attempts = record_attempts(client, "Step")
        sid = _sid("errors")
        client.open_session(sid, CFG)
        tok = Tokens(WorkerSession(sid, groups=1))

        bad = tok.step(2)
        bad.attn.shape[:] = [1, 3]  # 3 columns for 2 slots: shape and byte length disagree
        with pytest.raises(InvalidArgument, match=r"attn") as info:
            client.step([bad])
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT

        with pytest.raises(FailedPrecondition, match="expected step 1"):
            client.step([tok.step(2, step=5)])
        with pytest.raises(SessionNotFound, match="never-opened"):
            client.step([pack_step(WorkerSession("never-opened", 1), torch.arange(1), torch.ones(1, 1),
                                   torch.ones(1, 1), torch.full((1, 1, 1), -1), torch.zeros(1, 1, 1))])
        worker_lies = tok.step(2)
        worker_lies.retained_count = 7
        with pytest.raises(FailedPrecondition, match="diverged"):
            client.step([worker_lies])
        # Every one of these failed exactly once: non-retryable codes are never retried.
        assert [code for _, code in attempts] == ["INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND",
                                                  "FAILED_PRECONDITION"]
        with pytest.raises(AlreadyExists, match="different config"):
            client.open_session(sid, {**CFG, "budget": 7})
        with pytest.raises(InvalidArgument, match="session_id"):
            client.open_session("has space", CFG)
        with pytest.raises(SessionNotFound):
            client.close_session(_sid("missing"))
        client.close_session(sid)
    with NexusClient(sc.target) as anonymous, pytest.raises(Unauthenticated, match="authorization"):
        anonymous.list_policies()
    with NexusClient(sc.target, api_key="wrong-key-0123456789") as wrong, pytest.raises(Unauthenticated):
        wrong.list_policies()
    with NexusClient(sc.target, api_key=RO_KEY) as ro:
        assert ro.list_policies()  # reads are allowed
        with pytest.raises(PermissionDenied, match="read-only"):
            ro.open_session(_sid("ro"), CFG)


def test_uds_target(keyed: tuple[InProcessSidecar, str]) -> None:
    _, uds = keyed
    assert uds.startswith("unix:/")
    with NexusClient(uds, api_key=RW_KEY) as client:
        sid = _sid("uds")
        client.open_session(sid, CFG)
        tok = Tokens(WorkerSession(sid, groups=1))
        (res,) = client.step([tok.step(8)])
        assert res.step == 1 and res.retained_count == CFG["budget"]
        assert client.get_session(sid).step == 1
        assert client.close_session(sid) == 1


def test_full_queue_is_retried_with_the_same_step(slow_queue: InProcessSidecar) -> None:
    """RESOURCE_EXHAUSTED from a real full queue: retried with the same step number; same answer."""
    first = NexusClient(slow_queue.target)
    second = NexusClient(ClientOptions(slow_queue.target, retries=8, backoff_s=0.2, timeout_s=10))
    try:
        a, b, ref = _sid("hold"), _sid("retry"), _sid("reference")
        for sid in (a, b, ref):
            first.open_session(sid, CFG)
        attempts = record_attempts(second, "Step")
        msg_b = Tokens(WorkerSession(b, 1), seed=3).step(9)
        with ThreadPoolExecutor(1) as pool:
            hold = pool.submit(first.step, [Tokens(WorkerSession(a, 1)).step(4)])
            deadline = time.monotonic() + 10
            while slow_queue.pending() < 1:  # A now fills the one-step queue for ~1 s
                assert time.monotonic() < deadline, "step of session A never reached the queue"
                time.sleep(0.005)
            (res_b,) = second.step([msg_b])
            hold.result(30)
        codes = [code for _, code in attempts]
        assert codes[0] == "RESOURCE_EXHAUSTED" and codes[-1] == "OK", codes
        assert set(codes[:-1]) == {"RESOURCE_EXHAUSTED"}
        assert {step for step, _ in attempts} == {1}, "every attempt carries step 1"
        # A single successful call with the same payload (another session, same config) decides the same.
        msg_ref = Tokens(WorkerSession(ref, 1), seed=3).step(9)
        (res_ref,) = first.step([msg_ref])
        assert same_answer(res_b, res_ref)
        assert unpack_result(res_b)[1][0].numel() == 9 - CFG["budget"]
        # And re-sending step 1 now (a late retry) returns the stored answer, not a second application.
        (again,) = second.step([msg_b])
        assert again == res_b and second.get_session(b).step == 1
    finally:
        first.close()
        second.close()


def test_deadline_is_honoured_and_the_step_can_be_retried(slow_queue: InProcessSidecar) -> None:
    """A 0.2 s deadline against a batcher that waits 1 s: DEADLINE_EXCEEDED in ~0.2 s, nothing applied."""
    with NexusClient(ClientOptions(slow_queue.target, timeout_s=0.2, retries=0)) as hasty, \
            NexusClient(slow_queue.target) as patient:
        sid = _sid("deadline")
        patient.open_session(sid, CFG)
        msg = Tokens(WorkerSession(sid, 1)).step(3)
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded) as info:
            hasty.step([msg])
        elapsed = time.monotonic() - t0
        assert info.value.retryable
        assert elapsed < 0.9, f"the call took {elapsed:.2f} s: the 0.2 s deadline was not honoured"
        time.sleep(1.1)  # the expired job leaves the queue uncomputed
        assert patient.get_session(sid).step == 0
        (res,) = patient.step([msg])  # the same step number, now with time to spare
        assert res.step == 1


def test_unavailable_until_the_sidecar_starts_then_retried() -> None:
    """The first attempt finds no server (UNAVAILABLE); the sidecar starts during the backoff."""
    port = free_port()
    options = ClientOptions(f"127.0.0.1:{port}", retries=10, backoff_s=0.1, timeout_s=5)
    with NexusClient(options) as client:
        attempts = record_attempts(client, "ListPolicies")
        late = InProcessSidecar(grpc_port=port)
        try:
            with ThreadPoolExecutor(1) as pool:
                call = pool.submit(client.list_policies)
                deadline = time.monotonic() + 10
                while not attempts:
                    assert time.monotonic() < deadline, "no attempt was made"
                    time.sleep(0.005)
                late.start()
                policies = call.result(60)
            assert {p.name for p in policies} >= {"nexus"}
            codes = [code for _, code in attempts]
            assert codes[0] == "UNAVAILABLE" and codes[-1] == "OK", codes
            # The channel recovered: a whole session now works on the same client.
            sid = _sid("late")
            client.open_session(sid, CFG)
            (res,) = client.step([Tokens(WorkerSession(sid, 1)).step(2)])
            assert res.step == 1
        finally:
            late.stop()


def test_unreachable_gives_up_with_unavailable() -> None:
    options = ClientOptions(f"127.0.0.1:{free_port()}", retries=2, backoff_s=0.01, timeout_s=2)
    with NexusClient(options) as client:
        attempts = record_attempts(client, "ListPolicies")
        with pytest.raises(Unavailable) as info:
            client.list_policies()
        assert isinstance(info.value, SidecarError) and info.value.retryable
        assert [code for _, code in attempts] == ["UNAVAILABLE"] * 3


# -- async client -----------------------------------------------------------------------------


def _run(coro_fn: Callable[[], Any]) -> Any:
    return asyncio.run(coro_fn())


def test_async_open_step_get_list_close_and_errors(keyed: tuple[InProcessSidecar, str]) -> None:
    sc, uds = keyed

    async def main() -> None:
        for target in (sc.target, uds):
            async with AsyncNexusClient(target, api_key=RW_KEY) as client:
                assert "nexus" in {p.name for p in await client.list_policies()}
                sid = _sid("async")
                assert (await client.open_session(sid, CFG)).step == 0
                tok = Tokens(WorkerSession(sid, 1))
                for i, k in enumerate([5, 3], start=1):
                    (res,) = await client.step([tok.step(k)])
                    assert res.step == i
                    tok.commit(res, k)
                snap = await client.get_session(sid)
                assert snap.step == 2 and snap.retained_count == CFG["budget"] == tok.ws.retained_count
                with pytest.raises(FailedPrecondition, match="expected step 3"):
                    await client.step([tok.step(1, step=9)])
                bad = tok.step(1)
                bad.edge_weight.dtype = pb.D_TYPE_INT32
                with pytest.raises(InvalidArgument, match="edge_weight"):
                    await client.step([bad])
                with pytest.raises(AlreadyExists):
                    await client.open_session(sid, {**CFG, "budget": 9})
                assert await client.close_session(sid) == 2
                with pytest.raises(SessionNotFound):
                    await client.get_session(sid)
        async with AsyncNexusClient(sc.target) as anonymous:
            with pytest.raises(Unauthenticated):
                await anonymous.list_policies()

    _run(main)


def test_async_full_queue_retried_and_deadline(slow_queue: InProcessSidecar) -> None:
    async def main() -> None:
        async with AsyncNexusClient(slow_queue.target) as first, \
                AsyncNexusClient(ClientOptions(slow_queue.target, retries=8, backoff_s=0.2)) as second:
            a, b, ref = _sid("ahold"), _sid("aretry"), _sid("aref")
            for sid in (a, b, ref):
                await first.open_session(sid, CFG)
            attempts = record_attempts(second, "Step")
            hold = asyncio.create_task(first.step([Tokens(WorkerSession(a, 1)).step(4)]))
            for _ in range(2000):
                if slow_queue.pending() >= 1:
                    break
                await asyncio.sleep(0.005)
            assert slow_queue.pending() >= 1, "step of session A never reached the queue"
            (res_b,) = await second.step([Tokens(WorkerSession(b, 1), seed=5).step(8)])
            await hold
            codes = [code for _, code in attempts]
            assert codes[0] == "RESOURCE_EXHAUSTED" and codes[-1] == "OK", codes
            assert {step for step, _ in attempts} == {1}
            (res_ref,) = await first.step([Tokens(WorkerSession(ref, 1), seed=5).step(8)])
            assert same_answer(res_b, res_ref)

        async with AsyncNexusClient(ClientOptions(slow_queue.target, timeout_s=0.2, retries=0)) as hasty:
            sid = _sid("adeadline")
            await hasty.open_session(sid, CFG)
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                await hasty.step([Tokens(WorkerSession(sid, 1)).step(2)])
            assert time.monotonic() - t0 < 0.9

    _run(main)


def test_resource_exhausted_is_retryable_type() -> None:
    assert ResourceExhausted.retryable and Unavailable.retryable and DeadlineExceeded.retryable
    assert not InvalidArgument.retryable and not FailedPrecondition.retryable and not SessionNotFound.retryable
