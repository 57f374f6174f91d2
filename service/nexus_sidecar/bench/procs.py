"""Real processes for benchmarks and the demo: a sidecar, an echo server, a redis-server.

Each starts on a free loopback port, is health-checked before use, and is always stopped
(context managers). Nothing here is mocked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
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


def start_sidecar(*args: str, ports: tuple[int, int], log_path: str | os.PathLike[str],
                  env: dict[str, str] | None = None, timeout: float = 60.0) -> SidecarProc:
    """Start ``nexus-sidecar serve`` on ``ports`` (gRPC, HTTP) with extra ``args``, its output
    appended to ``log_path``, and wait until it is SERVING; the caller stops it (:func:`stop_process`)."""
    gport, hport = ports
    cmd = [sys.executable, "-m", "nexus_sidecar.cli", "serve", "--grpc-host", "127.0.0.1", "--grpc-port", str(gport),
           "--http-host", "127.0.0.1", "--http-port", str(hport), "--log-level", "WARNING", *args]
    with open(log_path, "ab") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        wait_serving(f"127.0.0.1:{gport}", timeout, proc)
    except BaseException:
        stop_process(proc)
        raise
    return SidecarProc(proc, gport, hport)


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


class RedisServer:
    """A redis-server on a free loopback port with its data in ``dir``, which faults can pause
    (SIGSTOP/SIGCONT), kill (SIGKILL) and restart on the same port and AOF. Stop it with :meth:`stop`."""

    def __init__(self, dir: str | os.PathLike[str], *, aof: bool = True) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: run scripts/install_system_deps.sh")
        self.binary, self.dir, self.port = binary, str(dir), free_port()
        # appendfsync always: every acknowledged write is on disk, so a SIGKILL loses nothing.
        self.args = ["--appendonly", "yes", "--appendfsync", "always"] if aof else ["--appendonly", "no"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart after :meth:`kill`) on the same port and directory; waits until it accepts."""
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log"),
                                      *self.args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def pause(self) -> None:
        """SIGSTOP: Redis holds every connection and answers nothing until :meth:`resume`."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL (no shutdown, no final save: what the AOF holds is what survives)."""
        assert self.proc is not None
        self.resume()
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.resume()
            stop_process(self.proc, timeout=5)
