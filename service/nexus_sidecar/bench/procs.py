"""Real processes for benchmarks and the demo: a sidecar, an echo server, a redis-server.

Each starts on a free loopback port, is health-checked before use, and is always stopped
(context managers). Nothing here is mocked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(target: str, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until grpc.health.v1 says SERVING (or raise with the process output)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise RuntimeError(f"server exited with {proc.returncode}:\n{out[-3000:]}")
            with contextlib.suppress(grpc.RpcError):
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.1)
    raise TimeoutError(f"{target} not SERVING after {timeout}s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM, wait ``timeout`` s, then SIGKILL (idempotent; also for the tests' servers)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@dataclass
class SidecarProc:
    """A running ``nexus-sidecar serve`` process."""

    proc: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


@contextlib.contextmanager
def sidecar_process(*args: str, env: dict[str, str] | None = None, timeout: float = 60.0,
                    log_path: str | os.PathLike[str] | None = None, ports: tuple[int, int] | None = None
                    ) -> Iterator[SidecarProc]:
    """Start ``nexus-sidecar serve`` on free loopback ports (or ``ports``: gRPC, HTTP) with extra
    ``args``; stop it after. ``log_path`` receives its output (else a pipe, read on failure)."""
    gport, hport = ports or (free_port(), free_port())
    cmd = [sys.executable, "-m", "nexus_sidecar.cli", "serve", "--grpc-host", "127.0.0.1", "--grpc-port", str(gport),
           "--http-host", "127.0.0.1", "--http-port", str(hport), "--log-level", "WARNING", *args]
    out = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, stdout=out if out is not None else subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    try:
        wait_serving(f"127.0.0.1:{gport}", timeout, proc)
        yield SidecarProc(proc, gport, hport)
    finally:
        stop_process(proc)
        if out is not None:
            out.close()


@dataclass
class EchoProc:
    """A running bare gRPC echo server."""

    target: str
    pid: int


@contextlib.contextmanager
def echo_process(timeout: float = 30.0) -> Iterator[EchoProc]:
    """Start the bare gRPC echo server; yields its target and pid."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nexus_sidecar.bench.echo_server", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_serving(f"127.0.0.1:{port}", timeout, proc)
        yield EchoProc(f"127.0.0.1:{port}", proc.pid)
    finally:
        stop_process(proc)


@contextlib.contextmanager
def redis_process() -> Iterator[str]:
    """Start a throwaway redis-server (no persistence); yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found: run scripts/install_system_deps.sh")
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", d], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            stop_process(proc)
