"""Redis state store (standalone or Cluster) with a Lua compare-and-set on the step number.

Key layout: one hash per session, ``<prefix>:{<tenant>:<session_id>}:state`` with fields
``step`` (decimal, the newest checkpoint), ``blob`` (the full serialized state), ``full`` (its
step), ``delta`` (the changes since it, at ``step``; absent right after a full write) and
``epoch``. Everything of one session lives in that one hash, under the ``{tenant:session}`` hash
tag, so it sits in one Cluster slot and the CAS script touches a single key.

Listing uses ``SCAN MATCH <prefix>:{<tenant>:*}:state`` on every primary instead of a
per-tenant index set: an index set would live in another slot (no atomic update with the
state in Cluster) and would keep ids of sessions whose state already expired. SCAN is
O(keyspace) per call, which is acceptable for an admin/inspection operation, never on the
step path.

TTL is sliding: every get and put (also a refused put) re-arms it.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from importlib import resources
from typing import Any

from redis import exceptions as rex
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from nexus_sidecar.server.stores.base import (
    Fenced,
    OnOp,
    StoredState,
    StoreError,
    StoreUnavailable,
    observe,
    validate_id,
    validate_step,
)

__all__ = ["RedisStore", "load_cas_script"]

# Errors that mean "Redis is not reachable right now" (retry later / degrade), as opposed to a
# request Redis rejected. BusyLoadingError (a restarting Redis) is a ConnectionError subclass.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    rex.ConnectionError,
    rex.TimeoutError,
    rex.ClusterDownError,
    rex.TryAgainError,
    rex.MasterDownError,
    rex.MaxConnectionsError,
    rex.RedisClusterException,  # "cannot connect to any startup node" and slot coverage errors
    OSError,
)
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")
_PREFIX_OK = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def load_cas_script(name: str = "cas.lua") -> str:
    """A Lua source from package data (``cas.lua``, ``claim.lua`` next to this module)."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _translate(op: str, exc: BaseException) -> StoreError:
    if isinstance(exc, _UNAVAILABLE):
        return StoreUnavailable(f"redis {op}: unavailable: {type(exc).__name__}: {exc}")
    return StoreError(f"redis {op}: {type(exc).__name__}: {exc}")


class RedisStore:
    """``StateStore`` on ``redis.asyncio.Redis`` or ``redis.asyncio.cluster.RedisCluster``."""

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        ttl_seconds: float | None = None,
        prefix: str = "nexus",
        on_op: OnOp | None = None,
    ) -> None:
        """Wrap an existing client (it must use ``decode_responses=False``: blobs are binary)."""
        if ttl_seconds is not None and not ttl_seconds > 0:
            raise StoreError(f"ttl_seconds: must be > 0 or None, got {ttl_seconds}")
        if not _PREFIX_OK.fullmatch(prefix):
            raise StoreError(f"prefix: {prefix!r} must match {_PREFIX_OK.pattern}")
        self._client = client
        self._cluster = isinstance(client, RedisCluster)
        # Whole milliseconds, at least 1: "0" means "no expiry" to the script.
        self._ttl_ms = 0 if ttl_seconds is None else max(1, round(ttl_seconds * 1000))
        self._prefix = prefix
        self._on_op = on_op
        # EVALSHA with an EVAL fallback instead of redis-py's register_script: its NOSCRIPT path
        # broadcasts SCRIPT LOAD to every Cluster primary, which breaks under concurrent first
        # use (redis-py 8 asyncio cluster). EVAL is routed by the key and caches the script on
        # that node, so after a restart or failover the next call reloads it transparently.
        self._cas_src = load_cas_script()
        self._ready = not self._cluster
        self._init_lock = asyncio.Lock()
        self._cas_sha = hashlib.sha1(self._cas_src.encode()).hexdigest()
        self._claim_src = load_cas_script("claim.lua")
        self._claim_sha = hashlib.sha1(self._claim_src.encode()).hexdigest()

    shared = True  # other replicas write the same keys: owner epochs are checked on every step

    async def _script(self, sha: str, src: str, key: str, *args: Any) -> Any:
        try:
            return await self._client.evalsha(sha, 1, key, *args)
        except rex.NoScriptError:
            return await self._client.eval(src, 1, key, *args)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        cluster: bool = False,
        ttl_seconds: float | None = None,
        prefix: str = "nexus",
        on_op: OnOp | None = None,
        socket_timeout: float = 2.0,
        retries: int = 1,
    ) -> RedisStore:
        """Connect lazily to ``redis://``/``rediss://`` (standalone) or a Cluster.

        Cluster mode is chosen by ``cluster=True`` or the ``redis+cluster://`` /
        ``rediss+cluster://`` scheme (the URL then names any one node). ``socket_timeout``
        bounds connect and command time and ``retries`` the retries on connection errors, so
        an unreachable Redis fails fast with ``StoreUnavailable`` instead of stalling a step.
        """
        scheme, sep, rest = url.partition("://")
        if not sep:
            raise StoreError(f"url: {url!r} has no scheme (expected redis://, rediss:// or redis+cluster://)")
        if scheme in ("redis+cluster", "rediss+cluster"):
            cluster = True
            scheme = scheme.removesuffix("+cluster")
        if scheme not in ("redis", "rediss"):
            raise StoreError(f"url: unsupported scheme {scheme!r} (expected redis, rediss or redis+cluster)")
        plain = f"{scheme}://{rest}"
        kwargs: dict[str, Any] = {
            "decode_responses": False,
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
            "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), retries),
        }
        client: Redis | RedisCluster
        client = RedisCluster.from_url(plain, **kwargs) if cluster else Redis.from_url(plain, **kwargs)
        return cls(client, ttl_seconds=ttl_seconds, prefix=prefix, on_op=on_op)

    @property
    def client(self) -> Redis | RedisCluster:
        """The underlying redis-py client (for admin and tests)."""
        return self._client

    async def _ensure_ready(self) -> None:
        """Initialize a Cluster client once, before any concurrent command.

        redis-py 8's asyncio RedisCluster, used concurrently before its first ``initialize``,
        hands out unconnected connections ("'NoneType' object has no attribute 'writelines'"
        on concurrent EVALs); initializing once under a lock avoids that race.
        """
        if self._ready:
            return
        async with self._init_lock:
            if not self._ready:
                await self._client.initialize()
                self._ready = True

    def key(self, tenant: str, session_id: str) -> str:
        """The Redis key of a session's state (validates both ids)."""
        validate_id("tenant", tenant, allow_colon=False)
        validate_id("session_id", session_id)
        return f"{self._prefix}:{{{tenant}:{session_id}}}:state"

    async def get(self, tenant: str, session_id: str) -> StoredState | None:
        """Return the stored state and re-arm its TTL, or None."""
        key = self.key(tenant, session_id)
        with observe(self._on_op, "get") as outcome:
            try:
                # Both commands hit the same slot; one round trip. A key deleted between the
                # two makes PEXPIRE a harmless no-op.
                await self._ensure_ready()
                pipe = self._client.pipeline(transaction=False)
                pipe.hmget(key, "step", "blob", "delta")
                if self._ttl_ms:
                    pipe.pexpire(key, self._ttl_ms)
                res = await pipe.execute()
            except Exception as exc:
                raise _translate("get", exc) from exc
            step, blob, delta = res[0]
            if step is None or blob is None:
                outcome[0] = "miss"
                return None
            return StoredState(step=int(step), blob=bytes(blob), delta=None if delta is None else bytes(delta))

    async def put(self, tenant: str, session_id: str, step: int, blob: bytes, epoch: int | None = None,
                  base: int | None = None) -> bool:
        """Compare-and-set via ``cas.lua``: write iff nothing is stored or stored step < ``step``,
        and (``epoch`` given) the session's owner epoch is still ``epoch`` (else :class:`Fenced`);
        with ``base``, a delta written iff the stored full blob is the one of step ``base``."""
        key = self.key(tenant, session_id)
        validate_step(step)
        if base is not None:
            validate_step(base)
        if not isinstance(blob, bytes | bytearray | memoryview):
            raise StoreError(f"blob: must be bytes, got {type(blob).__name__}")
        with observe(self._on_op, "put") as outcome:
            try:
                await self._ensure_ready()
                written, stored = await self._script(self._cas_sha, self._cas_src, key, str(step), bytes(blob),
                                                     self._ttl_ms, "" if epoch is None else str(epoch),
                                                     "" if base is None else str(base))
            except Exception as exc:
                raise _translate("put", exc) from exc
            if int(written) == -1:
                outcome[0] = "fenced"
                raise Fenced(f"session {session_id!r} is owned by epoch {int(stored)}, this writer holds {epoch}")
            if int(written) == 2:
                outcome[0] = "conflict_self"  # our own earlier write of this step (a retried command)
                return True
            if int(written) == -2:
                outcome[0] = "base"  # the delta's full checkpoint is not the stored one
                return False
            if int(written) != 1:
                outcome[0] = "conflict"
                return False
            return True

    async def delete(self, tenant: str, session_id: str) -> None:
        """Remove the session's state and leave a tombstone: a new owner epoch that fences every
        earlier writer (no error when absent)."""
        key = self.key(tenant, session_id)
        with observe(self._on_op, "delete"):
            try:
                await self._ensure_ready()
                await self._script(self._claim_sha, self._claim_src, key, "close", self._ttl_ms)
            except Exception as exc:
                raise _translate("delete", exc) from exc

    async def claim(self, tenant: str, session_id: str) -> tuple[int, StoredState | None]:
        """Take ownership: a new owner epoch, with the stored state (None when nothing is stored)."""
        key = self.key(tenant, session_id)
        with observe(self._on_op, "claim") as outcome:
            try:
                await self._ensure_ready()
                epoch, step, blob, delta = await self._script(self._claim_sha, self._claim_src, key, "claim",
                                                              self._ttl_ms)
            except Exception as exc:
                raise _translate("claim", exc) from exc
            if step is None or blob is None:
                outcome[0] = "miss"
                return int(epoch), None
            return int(epoch), StoredState(step=int(step), blob=bytes(blob),
                                           delta=None if delta is None else bytes(delta))

    async def epochs(self, tenant: str, session_ids: list[str]) -> list[int | None]:
        """The current owner epoch of each session (one pipelined round trip)."""
        keys = [self.key(tenant, sid) for sid in session_ids]
        with observe(self._on_op, "epochs"):
            try:
                await self._ensure_ready()
                pipe = self._client.pipeline(transaction=False)
                for k in keys:
                    pipe.hget(k, "epoch")
                res = await pipe.execute()
            except Exception as exc:
                raise _translate("epochs", exc) from exc
        return [None if e is None else int(e) for e in res]

    async def list(self, tenant: str) -> list[str]:
        """Sorted session ids of ``tenant`` (SCAN over every primary in Cluster mode)."""
        validate_id("tenant", tenant, allow_colon=False)
        head = f"{self._prefix}:{{{tenant}:"
        tail = "}:state"
        # Escape glob metacharacters so a tenant like "a*" cannot match other tenants.
        pattern = _GLOB_SPECIAL.sub(r"\\\1", head) + "*" + tail
        with observe(self._on_op, "list"):
            found: dict[str, str] = {}
            try:
                await self._ensure_ready()
                async for raw in self._client.scan_iter(match=pattern, count=1000):
                    k = raw.decode() if isinstance(raw, bytes) else raw
                    if k.startswith(head) and k.endswith(tail):
                        found[k[len(head) : -len(tail)]] = k
                # Tombstones (closed sessions: an epoch, no state) are not sessions.
                pipe = self._client.pipeline(transaction=False)
                ids = sorted(found)
                for sid in ids:
                    pipe.hexists(found[sid], "blob")
                alive = await pipe.execute() if ids else []
            except Exception as exc:
                raise _translate("list", exc) from exc
            return [sid for sid, ok in zip(ids, alive, strict=True) if ok]

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless Redis answers PING."""
        with observe(self._on_op, "ping"):
            try:
                await self._ensure_ready()
                await self._client.ping()
            except Exception as exc:
                raise _translate("ping", exc) from exc

    async def close(self) -> None:
        """Close the client's connections."""
        try:
            await self._client.aclose()
        except Exception as exc:
            raise _translate("close", exc) from exc
