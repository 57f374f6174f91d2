"""Client-side routing over several sidecar replicas: consistent hashing, sticky pins, failover.

A worker that talks to N replicas (a static list, or the A records of a Kubernetes headless
Service, re-resolved) pins each session to one replica by a consistent-hash ring with bounded
loads, so a replica's sessions stay hot on it and no replica takes much more than its share. When
a replica is lost (UNAVAILABLE or DEADLINE_EXCEEDED after the client's own retries, or it left the
DNS answer) its sessions move to the next replica on the ring. That replica resumes a session from
the shared store (Redis) on its first request; the store can be a few steps behind the worker (it
checkpoints every ``checkpoint_every`` steps), so the router keeps the worker's last ``replay``
acknowledged steps per session and re-sends those the new replica has not seen. The engine is
deterministic, so a replayed step gives the answer the lost replica gave, which is checked
(retained checksum) before the worker's current step goes on. When neither reaches back far enough
(the store lost the session, or it is older than the buffer), a router given ``worker_sessions``
re-seeds the session on the new replica from the worker's own truth (the Resync RPC with the
positions ``WorkerSession.advance`` tracks): nothing is lost, though the re-seeded tokens start
with fresh policy state; without it the router raises :class:`SessionLost`.

``AsyncNexusRouter`` is the implementation; ``NexusRouter`` runs it on a private event loop for
blocking code. Both wrap :class:`~nexus_client.client.AsyncNexusClient`, one per endpoint.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import dataclasses
import hashlib
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc

from nexus_client.client import AsyncNexusClient, ClientOptions
from nexus_client.errors import DeadlineExceeded, SessionNotFound, SidecarError, Unavailable
from nexus_client.packing import WorkerSession
from nexus_client.v1 import sidecar_pb2 as pb

T = TypeVar("T")

# A replica that answers these (after the client's retries) is treated as lost for this call.
LOST = (Unavailable, DeadlineExceeded)


class SessionLost(SidecarError):
    """A session could not be moved to another replica: the store and the replay buffer do not
    reach back far enough (raise ``replay`` to at least the sidecars' ``checkpoint_every``)."""

    def __init__(self, details: str) -> None:
        super().__init__(grpc.StatusCode.DATA_LOSS, details)


class NoReplica(Unavailable):
    """No replica is reachable (every endpoint is down or the endpoint list is empty)."""

    def __init__(self, details: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, details)


def _point(text: str) -> int:
    """A 64-bit ring position (blake2b: stable across processes and Python versions)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class HashRing:
    """Consistent-hash ring: each endpoint owns ``vnodes`` points; a key belongs to the first point
    at or after its hash. Removing an endpoint moves only its keys, spread over the others."""

    def __init__(self, endpoints: Sequence[str], vnodes: int = 256) -> None:
        if vnodes < 1:
            raise ValueError("vnodes must be >= 1")
        self.endpoints = tuple(sorted(set(endpoints)))
        points = sorted((_point(f"{ep}#{i}"), ep) for ep in self.endpoints for i in range(vnodes))
        self._keys = [p for p, _ in points]
        self._owners = [ep for _, ep in points]

    def candidates(self, key: str) -> Iterator[str]:
        """Every endpoint once, in ring order starting at ``key``'s owner."""
        if not self._owners:
            return
        start = bisect.bisect_left(self._keys, _point(key))
        seen: set[str] = set()
        for i in range(len(self._owners)):
            ep = self._owners[(start + i) % len(self._owners)]
            if ep not in seen:
                seen.add(ep)
                yield ep
                if len(seen) == len(self.endpoints):
                    return


class EndpointSource(Protocol):
    """Where the replica addresses come from."""

    async def resolve(self) -> list[str]:
        """The current ``host:port`` targets."""
        ...


@dataclass
class StaticEndpoints:
    """A fixed list of ``host:port`` targets (``set`` replaces it, e.g. from a config reload)."""

    targets: list[str]

    async def resolve(self) -> list[str]:
        """The list as it is now."""
        return list(self.targets)

    def set(self, targets: Sequence[str]) -> None:
        """Replace the list; the router picks it up at its next refresh."""
        self.targets = list(targets)


@dataclass
class DnsEndpoints:
    """The A records of a name (a Kubernetes headless Service lists one per ready pod)."""

    host: str
    port: int = 50051

    async def resolve(self) -> list[str]:
        """``ip:port`` per IPv4 address of ``host`` (the resolver runs off the event loop)."""
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self.host, self.port, family=socket.AF_INET, type=socket.SOCK_STREAM)
        except socket.gaierror:
            return []  # NXDOMAIN while no pod is ready: no endpoint, not a crash
        return sorted({f"{info[4][0]}:{self.port}" for info in infos})


@dataclass
class _Session:
    """What the router remembers of one session: where it lives and how to rebuild it elsewhere."""

    session_id: str
    key: str
    config: Mapping[str, Any] | None
    replay: collections.deque[tuple[pb.SessionStep, int]]  # acknowledged (step, its retained_checksum)
    acked: int = 0  # last step the worker got an answer for
    needs_resume: bool = False  # its key moved: bring the new replica up to date before stepping


@dataclass
class RouterStats:
    """Counters of the router's failovers (for logs and the drill test)."""

    moves: int = 0  # sessions moved to another replica
    replayed_steps: int = 0  # acknowledged steps re-sent to a new replica
    reopened: int = 0  # sessions the store did not have yet, rebuilt from step 1 by replay
    resynced: int = 0  # sessions re-seeded from the worker's positions (Resync RPC)
    lost_endpoints: list[str] = field(default_factory=list)


class AsyncNexusRouter:
    """Routes sessions over several sidecars; same calls as :class:`AsyncNexusClient`.

    ``endpoints``: a list of ``host:port`` targets or an :class:`EndpointSource` (e.g.
    :class:`DnsEndpoints`, re-resolved every ``refresh_s``). ``options`` is the per-endpoint
    client template (its ``target`` is ignored). ``affinity`` maps a session id to its routing key:
    by default each session is placed on its own; ``lambda sid: worker_id`` keeps a worker's
    sessions on one replica, so one Step RPC carries them all. ``load_factor`` bounds a replica's
    share of keys at ``load_factor`` x the mean (consistent hashing with bounded loads).
    """

    def __init__(self, endpoints: Sequence[str] | EndpointSource, *, options: ClientOptions | None = None,
                 api_key: str | None = None, vnodes: int = 256, load_factor: float = 1.1, replay: int = 32,
                 refresh_s: float = 10.0, down_s: float = 30.0, affinity: Callable[[str], str] | None = None,
                 worker_sessions: Callable[[str], WorkerSession | None] | None = None) -> None:
        if load_factor < 1.0:
            raise ValueError("load_factor must be >= 1")
        if isinstance(endpoints, str):  # one "host:port", not a sequence of characters
            endpoints = [endpoints]
        self.source: EndpointSource = (StaticEndpoints(list(endpoints)) if isinstance(endpoints, Sequence)
                                       else endpoints)
        self.options = options or ClientOptions("", api_key=api_key)
        self.vnodes, self.load_factor, self.replay = vnodes, load_factor, replay
        self.refresh_s, self.down_s = refresh_s, down_s
        self.affinity = affinity or (lambda sid: sid)
        self.worker_sessions = worker_sessions  # session id -> the worker's WorkerSession (for Resync)
        self.stats = RouterStats()
        self._ring = HashRing([], vnodes)
        self._clients: dict[str, AsyncNexusClient] = {}
        self._pins: dict[str, str] = {}  # routing key -> endpoint
        self._load: collections.Counter[str] = collections.Counter()  # endpoint -> keys pinned to it
        self._members: dict[str, set[str]] = collections.defaultdict(set)  # routing key -> its session ids
        self._sessions: dict[str, _Session] = {}
        self._down: dict[str, float] = {}  # endpoint -> monotonic time it was found lost
        self._resolved_at = -math.inf

    # -- membership --------------------------------------------------------------------------
    async def refresh(self, force: bool = False) -> list[str]:
        """Re-resolve the endpoints (at most every ``refresh_s`` unless ``force``); returns them."""
        now = time.monotonic()
        if force or now - self._resolved_at >= self.refresh_s:
            self._resolved_at = now
            found = await self.source.resolve()
            if tuple(sorted(set(found))) != self._ring.endpoints:
                self._ring = HashRing(found, self.vnodes)
                gone = [k for k, ep in self._pins.items() if ep not in self._ring.endpoints]
                for key in gone:
                    self._unpin(key)
        return list(self._ring.endpoints)

    def _alive(self) -> list[str]:
        now = time.monotonic()
        return [ep for ep in self._ring.endpoints if now - self._down.get(ep, -math.inf) >= self.down_s]

    def _client(self, endpoint: str) -> AsyncNexusClient:
        client = self._clients.get(endpoint)
        if client is None:
            client = self._clients[endpoint] = AsyncNexusClient(dataclasses.replace(self.options, target=endpoint))
        return client

    def distribution(self) -> dict[str, int]:
        """Sessions pinned to each known endpoint (0 for an endpoint with none)."""
        counts = dict.fromkeys(self._ring.endpoints, 0)
        for s in self._sessions.values():
            ep = self._pins.get(s.key)
            if ep is not None:
                counts[ep] = counts.get(ep, 0) + 1
        return counts

    def endpoint_of(self, session_id: str) -> str | None:
        """The replica a session is pinned to (None before it is opened or while it is unpinned)."""
        s = self._sessions.get(session_id)
        return self._pins.get(s.key) if s is not None else None

    def _place(self, key: str) -> str:
        """Pin ``key`` to the first live endpoint on its ring walk that is under the load bound."""
        alive = set(self._alive())
        if not alive:
            raise NoReplica(f"no sidecar replica reachable (known: {list(self._ring.endpoints) or 'none'})")
        load = self._load  # kept up to date on every pin and unpin: placing is O(replicas), not O(sessions)
        cap = math.ceil(self.load_factor * (sum(load[ep] for ep in alive) + 1) / len(alive))
        choice = next((ep for ep in self._ring.candidates(key) if ep in alive and load[ep] < cap), None)
        if choice is None:  # every live endpoint at the bound (rounding): the ring owner takes it
            choice = next(ep for ep in self._ring.candidates(key) if ep in alive)
        self._pin(key, choice)
        return choice

    def _pin(self, key: str, endpoint: str) -> None:
        self._release(key)
        self._pins[key] = endpoint
        self._load[endpoint] += 1

    def _release(self, key: str) -> None:
        """Forget ``key``'s pin (and its share of its replica's load)."""
        old = self._pins.pop(key, None)
        if old is not None:
            self._load[old] -= 1

    def _unpin(self, key: str) -> None:
        """Forget ``key``'s replica; its sessions resume wherever it lands next."""
        self._release(key)
        for sid in self._members.get(key, ()):
            self._sessions[sid].needs_resume = True

    def _endpoint(self, s: _Session) -> str:
        ep = self._pins.get(s.key)
        return ep if ep is not None else self._place(s.key)

    def _lost(self, endpoint: str) -> None:
        """Mark ``endpoint`` down and unpin everything on it."""
        self._down[endpoint] = time.monotonic()
        if endpoint not in self.stats.lost_endpoints:
            self.stats.lost_endpoints.append(endpoint)
        for key in [k for k, ep in self._pins.items() if ep == endpoint]:
            self._unpin(key)

    async def _on_replica(self, s: _Session, call: Callable[[AsyncNexusClient], Any]) -> Any:
        """Run ``call`` on the session's replica, moving the session when the replica is lost."""
        for _ in range(len(self._ring.endpoints) + 1):
            ep = self._endpoint(s)
            try:
                if s.needs_resume:
                    await self._resume(s, ep)
                return await call(self._client(ep))
            except LOST:
                self._lost(ep)
        raise NoReplica(f"session {s.session_id!r}: every replica failed")

    # -- the client's calls --------------------------------------------------------------------
    async def open_session(self, session_id: str, config: Mapping[str, Any] | None = None
                           ) -> pb.OpenSessionResponse:
        """Pin the session to a replica and open it there (idempotent, like the client's)."""
        await self.refresh()
        s = self._sessions.get(session_id)
        if s is None:
            s = _Session(session_id, self.affinity(session_id), config, collections.deque(maxlen=self.replay))
            self._sessions[session_id] = s
            self._members[s.key].add(session_id)
        return await self._on_replica(s, lambda c: c.open_session(session_id, config))

    async def step(self, steps: Sequence[pb.SessionStep]) -> list[pb.SessionResult]:
        """One step of each session, one RPC per replica (concurrently); results in request order."""
        await self.refresh()
        pending = list(range(len(steps)))
        results: dict[int, pb.SessionResult] = {}
        for _ in range(len(self._ring.endpoints) + 1):
            groups: dict[str, list[int]] = collections.defaultdict(list)
            for i in pending:
                groups[self._endpoint(self._session(steps[i].session_id))].append(i)
            outcome = await asyncio.gather(*(self._step_on(ep, [steps[i] for i in idx]) for ep, idx in groups.items()),
                                           return_exceptions=True)
            pending = []
            for (ep, idx), out in zip(groups.items(), outcome, strict=True):
                if isinstance(out, LOST):
                    self._lost(ep)
                    pending += idx
                elif isinstance(out, BaseException):
                    raise out
                else:
                    results.update(zip(idx, out, strict=True))
            if not pending:
                for i, st in enumerate(steps):
                    s = self._session(st.session_id)
                    if st.step > s.acked:  # a retried step is already in the buffer
                        s.replay.append((st, results[i].retained_checksum))
                        s.acked = st.step
                return [results[i] for i in range(len(steps))]
        raise NoReplica(f"{len(pending)} session(s) found no replica that answers")

    async def _step_on(self, endpoint: str, steps: list[pb.SessionStep]) -> list[pb.SessionResult]:
        for st in steps:
            s = self._session(st.session_id)
            if s.needs_resume:
                await self._resume(s, endpoint)
        return await self._client(endpoint).step(steps)

    async def _resume(self, s: _Session, endpoint: str) -> None:
        """Bring ``endpoint`` up to the worker's last acknowledged step of ``s``.

        The replica loads the session from the store (GetSession); the acknowledged steps after
        the stored one are re-sent and must give the same retained checksum as the first time.
        """
        client = self._client(endpoint)
        try:
            stored = (await client.get_session(s.session_id)).step
        except SessionNotFound:
            stored = 0
        acked = [(st, ck) for st, ck in s.replay if st.step > stored]
        if stored < s.acked and (not acked or acked[0][0].step != stored + 1):
            if await self._resync(s, client):
                return
            kept = f"steps {s.replay[0][0].step}..{s.acked}" if s.replay else "no steps"
            raise SessionLost(f"session {s.session_id!r}: the store has step {stored}, the worker is at step "
                              f"{s.acked} and {kept} are kept for replay (replay={self.replay}; make it >= the "
                              "sidecars' checkpoint_every, or resync the session)")
        if stored == 0:
            await client.open_session(s.session_id, s.config)
            self.stats.reopened += 1
        for st, checksum in acked:
            (result,) = await client.step([st])
            if result.retained_checksum != checksum:
                raise SessionLost(f"session {s.session_id!r}: replayed step {st.step} on {endpoint} retained other "
                                  "tokens than the lost replica did")
            self.stats.replayed_steps += 1
        s.needs_resume = False
        self.stats.moves += 1

    async def _resync(self, s: _Session, client: AsyncNexusClient) -> bool:
        """Re-seed ``s`` on ``client``'s replica from the worker's positions; False if none given."""
        ws = self.worker_sessions(s.session_id) if self.worker_sessions is not None else None
        if ws is None or ws.step != s.acked or (ws.step and not ws.positions):
            return False  # no truth to send, or not the worker's state at the last answer it got
        # A copy: the Resync answer's count and checksum are the worker's own, but the worker's
        # object stays the worker's to change.
        await client.resync(dataclasses.replace(ws, positions=list(ws.positions)), s.config)
        # Steps before the re-seed belong to the lost lineage: never replay them on top of it.
        s.replay.clear()
        s.needs_resume = False
        self.stats.resynced += 1
        self.stats.moves += 1
        return True

    def _session(self, session_id: str) -> _Session:
        s = self._sessions.get(session_id)
        if s is None:
            raise SessionNotFound(grpc.StatusCode.NOT_FOUND,
                                  f"session {session_id!r} was not opened through this router")
        return s

    async def close_session(self, session_id: str) -> int:
        """Close the session on its replica and forget it."""
        s = self._session(session_id)
        step = await self._on_replica(s, lambda c: c.close_session(session_id))
        del self._sessions[session_id]
        self._members[s.key].discard(session_id)
        if not self._members[s.key]:
            del self._members[s.key]
            self._release(s.key)
        return int(step)

    async def get_session(self, session_id: str, include_weights: bool = False) -> pb.GetSessionResponse:
        """Retention snapshot from the session's replica."""
        s = self._session(session_id)
        return await self._on_replica(s, lambda c: c.get_session(session_id, include_weights))

    async def close(self) -> None:
        """Close every endpoint's channel."""
        await asyncio.gather(*(c.close() for c in self._clients.values()))
        self._clients.clear()

    async def __aenter__(self) -> AsyncNexusRouter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class NexusRouter:
    """Blocking twin of :class:`AsyncNexusRouter` (it runs on a private event-loop thread)."""

    def __init__(self, endpoints: Sequence[str] | EndpointSource, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nexus-router", daemon=True)
        self._thread.start()
        self._router: AsyncNexusRouter = self._run(self._make(endpoints, kwargs))

    async def _make(self, endpoints: Sequence[str] | EndpointSource, kwargs: dict[str, Any]) -> AsyncNexusRouter:
        return AsyncNexusRouter(endpoints, **kwargs)  # built on the loop: grpc.aio channels bind to it

    def _run(self, coro: Any) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result()

    @property
    def stats(self) -> RouterStats:
        """Failover counters."""
        return self._router.stats

    def open_session(self, session_id: str, config: Mapping[str, Any] | None = None) -> pb.OpenSessionResponse:
        """See :meth:`AsyncNexusRouter.open_session`."""
        return self._run(self._router.open_session(session_id, config))

    def step(self, steps: Sequence[pb.SessionStep]) -> list[pb.SessionResult]:
        """See :meth:`AsyncNexusRouter.step`."""
        return self._run(self._router.step(steps))

    def close_session(self, session_id: str) -> int:
        """See :meth:`AsyncNexusRouter.close_session`."""
        return self._run(self._router.close_session(session_id))

    def get_session(self, session_id: str, include_weights: bool = False) -> pb.GetSessionResponse:
        """See :meth:`AsyncNexusRouter.get_session`."""
        return self._run(self._router.get_session(session_id, include_weights))

    def distribution(self) -> dict[str, int]:
        """See :meth:`AsyncNexusRouter.distribution`."""
        return self._router.distribution()

    def endpoint_of(self, session_id: str) -> str | None:
        """See :meth:`AsyncNexusRouter.endpoint_of`."""
        return self._router.endpoint_of(session_id)

    def close(self) -> None:
        """Close the channels and stop the loop thread."""
        self._run(self._router.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> NexusRouter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
