"""Assembles the sidecar: engine, store, sessions, gRPC server (+health, reflection), HTTP port."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import grpc
import torch
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from nexus_client.v1 import sidecar_pb2 as pb

from nexus_sidecar.engine import POLICIES, Engine, default_device
from nexus_sidecar.server.allocator import tune_malloc
from nexus_sidecar.server.auth import DEFAULT_TENANT, KeyRing
from nexus_sidecar.server.http_app import build_app
from nexus_sidecar.server.metrics import Metrics
from nexus_sidecar.server.service import SERVICE_DESCRIPTOR, EvictionServicer, add_to_server
from nexus_sidecar.server.sessions import SessionManager
from nexus_sidecar.server.settings import ServerSettings
from nexus_sidecar.server.stores import MemoryStore, RedisStore, StateStore, bounded

log = logging.getLogger("nexus_sidecar")
SERVICE = pb.DESCRIPTOR.services_by_name["EvictionService"].full_name


class _QuietUvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: the sidecar owns SIGTERM (graceful drain)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def make_store(settings: ServerSettings, metrics: Metrics) -> StateStore:
    """The configured state store."""
    if settings.store == "memory":
        return MemoryStore(ttl_seconds=settings.store_ttl_s, on_op=metrics.on_store_op)
    return RedisStore.from_url(settings.store, ttl_seconds=settings.store_ttl_s, on_op=metrics.on_store_op,
                               socket_timeout=settings.store_timeout_s)


class Sidecar:
    """One sidecar process's servers. ``await start()``, then ``await stop()``."""

    def __init__(self, settings: ServerSettings, *, keys: KeyRing | None = None,
                 store: StateStore | None = None) -> None:
        self.settings = settings
        tune_malloc(settings.malloc_mmap_threshold_kb)
        self.metrics = Metrics()
        self.keys = keys if keys is not None else (
            KeyRing.from_file(settings.keys_file) if settings.keys_file else KeyRing())
        device = default_device() if settings.device == "auto" else torch.device(settings.device)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.engine = Engine(device)
        self.metrics.prime(self.keys.tenants or [DEFAULT_TENANT], sorted(POLICIES),
                           [m.name for m in SERVICE_DESCRIPTOR.methods], self.engine.device.type)
        self._owns_store = store is None  # a store handed in is the caller's to close
        self.store = store or make_store(settings, self.metrics)
        self.sessions = SessionManager(self.engine, self.store, settings, self.metrics)
        self.servicer = EvictionServicer(self.sessions, self.keys, self.metrics)
        self.health = health.aio.HealthServicer()
        self.grpc_port = 0
        self.http_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._http: _QuietUvicorn | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._ready_task: asyncio.Task[None] | None = None
        self._serving: bool | None = None

    async def start(self) -> None:
        """Bind both ports, then turn health SERVING once the store and the device answer."""
        s = self.settings
        self.sessions.start()
        server = grpc.aio.server(options=s.grpc_options(), maximum_concurrent_rpcs=s.max_concurrent_rpcs)
        add_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self.grpc_port = server.add_insecure_port(f"{s.grpc_host}:{s.grpc_port}")
        if s.uds:
            server.add_insecure_port(f"unix:{s.uds}")
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._grpc = server
        config = uvicorn.Config(build_app(self), host=s.http_host, port=s.http_port, log_level="warning",
                                lifespan="off", access_log=False)
        self._http = _QuietUvicorn(config)
        self._http_task = asyncio.create_task(self._http.serve())
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()  # re-raise a bind failure
            await asyncio.sleep(0.01)
        self.http_port = self._http.servers[0].sockets[0].getsockname()[1]
        report = await self.readiness()
        if not report["ready"]:
            log.warning("not ready at start-up: %s", report)
        self._ready_task = asyncio.create_task(self._watch_health())

    async def _watch_health(self) -> None:
        """Re-check readiness every second: gRPC health follows the store and the device both ways."""
        while not self._stopped.is_set():
            await asyncio.sleep(1.0)
            try:
                await self.readiness()
            except Exception:
                self.metrics.maintenance_errors.labels("health").inc()
                log.exception("readiness watch: unexpected error (counted in nexus_maintenance_errors_total)")

    async def _set_serving(self, on: bool) -> None:
        if on == self._serving:
            return
        self._serving = on
        status = health_pb2.HealthCheckResponse.SERVING if on else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(SERVICE, status)
        quiet = on or self.servicer.draining  # NOT_SERVING on shutdown is expected, not a warning
        log.log(logging.INFO if quiet else logging.WARNING, "gRPC health: %s", "SERVING" if on else "NOT_SERVING")

    async def readiness(self) -> dict[str, Any]:
        """Store ping + a tiny op on the device, each bounded by ``readiness_timeout_s``; not ready
        while draining. Sets gRPC health to the same verdict, so the two never disagree."""
        limit = self.settings.readiness_timeout_s
        report: dict[str, Any] = {"draining": self.servicer.draining, "device": str(self.engine.device)}
        try:
            async with bounded(limit):  # a ping cut short reports outcome "unavailable"
                await self.store.ping()
            report["store"] = "ok"
        except TimeoutError:
            report["store"] = f"unavailable: no answer within {limit} s"
            self.metrics.degraded.set(1)  # a hung store is unreachable too
        except Exception as exc:
            report["store"] = f"unavailable: {exc}"
        try:
            # Its own thread, not the engine's: a long batch in flight is not a dead device.
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.run_in_executor(
                None, lambda: float(torch.ones(1, device=self.engine.device).sum())), limit)
            report["device_ok"] = True
        except Exception as exc:
            report["device_ok"] = False
            report["device_error"] = str(exc) or type(exc).__name__
        report["ready"] = report["store"] == "ok" and report["device_ok"] and not report["draining"]
        if not self._stopped.is_set():
            await self._set_serving(report["ready"])
        return report

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: stop accepting, finish in-flight steps, checkpoint every dirty session."""
        if self._stopped.is_set():
            return
        grace = self.settings.shutdown_grace_s if grace is None else grace
        self.servicer.draining = True
        await self._set_serving(False)
        if self._ready_task is not None:
            self._ready_task.cancel()
        await self.sessions.shutdown()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http_task, timeout=5)
        if self._owns_store:
            await self.store.close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        """Block until :meth:`stop` finished."""
        await self._stopped.wait()
