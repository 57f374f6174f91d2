"""Shared fixtures: real servers the tests run against (no mocks where a real one exists).

Redis fixtures start real ``redis-server`` processes on free ports in tmp dirs and always stop
them at teardown. A missing ``redis-server`` FAILS the test with the install hint: a skipped
store test would let CI pass without ever touching Redis.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import torch
from nexus_sidecar.bench.procs import free_port, stop_process

_INSTALL_HINT = (
    "redis-server/redis-cli not found: run scripts/install_system_deps.sh (apt: redis-server redis-tools)"
)


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(_INSTALL_HINT, pytrace=False)
    return path


@dataclass
class RedisProc:
    """One running redis-server process."""

    port: int
    dir: Path
    proc: subprocess.Popen[bytes]
    host: str = "127.0.0.1"
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.dir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def client(self) -> redis.Redis:
        """A sync client for assertions on raw Redis state (binary responses)."""
        return redis.Redis(host=self.host, port=self.port, socket_timeout=2)

    def stop(self) -> None:
        """Terminate the server (idempotent)."""
        stop_process(self.proc, timeout=5)

    def restart(self, *extra: str) -> subprocess.Popen[bytes]:
        """A new redis-server on the same port and directory (an AOF brings its data back), once it
        answers PING; the caller stops the returned process. ``extra``: server options (``--appendonly yes``)."""
        proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", self.host, "--save", "",
                                 "--dir", str(self.dir), "--logfile", str(self.dir / "redis-restart.log"), *extra],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with self.client() as c:
                    c.ping()
                return proc
            except redis.ConnectionError:
                time.sleep(0.05)
        proc.kill()
        raise AssertionError("redis did not come back")


def _start_redis(tmp: Path, *extra: str) -> RedisProc:
    binary = _require("redis-server")
    last_err: Exception | None = None
    last_log = ""
    for _ in range(5):  # a free port can be taken between probing and binding: retry
        port = free_port()
        d = tmp / f"redis-{port}"
        d.mkdir(parents=True, exist_ok=True)
        args = [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(d),
            "--logfile",
            str(d / "redis.log"),
            *extra,
        ]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rp = RedisProc(port=port, dir=d, proc=proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with rp.client() as c:
                    c.ping()
                return rp
            except redis.ConnectionError as e:
                last_err = e
                time.sleep(0.02)
        log = rp.log.read_text(errors="replace")[-2000:] if rp.log.exists() else ""
        rp.stop()
        last_log = log
    pytest.fail(f"redis-server did not start: {last_err}\n{last_log}", pytrace=False)


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisProc]]:
    """Start extra standalone servers inside a test (e.g. to stop one); all stopped at teardown."""
    started: list[RedisProc] = []

    def start(*extra: str) -> RedisProc:
        rp = _start_redis(tmp_path, *extra)
        started.append(rp)
        return rp

    yield start
    for rp in started:
        rp.stop()


@pytest.fixture(scope="session")
def _redis_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProc]:
    rp = _start_redis(tmp_path_factory.mktemp("redis"))
    yield rp
    rp.stop()


@pytest.fixture
def redis_server(_redis_session: RedisProc) -> RedisProc:
    """A real standalone redis-server (shared by the session), flushed before each test."""
    with _redis_session.client() as c:
        c.flushall()
    return _redis_session


@dataclass
class RedisClusterProcs:
    """A running 3-primary Redis Cluster (no replicas)."""

    nodes: list[RedisProc]

    @property
    def url(self) -> str:
        """A ``redis+cluster://`` URL naming the first node (redis-py discovers the rest)."""
        n = self.nodes[0]
        return f"redis+cluster://{n.host}:{n.port}"

    def flushall(self) -> None:
        for n in self.nodes:
            with n.client() as c:
                c.flushall()

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


@pytest.fixture(scope="session")
def _redis_cluster_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcs]:
    cli = _require("redis-cli")
    tmp = tmp_path_factory.mktemp("redis-cluster")
    cluster = RedisClusterProcs(nodes=[])
    try:
        for i in range(3):
            cluster.nodes.append(
                _start_redis(
                    tmp,
                    *("--cluster-enabled", "yes", "--cluster-node-timeout", "2000"),
                    *("--cluster-config-file", str(tmp / f"nodes-{i}.conf")),
                )
            )
        addrs = [f"127.0.0.1:{n.port}" for n in cluster.nodes]
        create = [cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"]
        proc = subprocess.run(create, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed:\n{proc.stdout}\n{proc.stderr}", pytrace=False)
        # Every node must agree the cluster is usable before tests route commands to it.
        deadline = time.monotonic() + 20
        pending = list(cluster.nodes)
        while pending and time.monotonic() < deadline:
            with pending[0].client() as c:
                info = c.execute_command("CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" in text:
                pending.pop(0)
            else:
                time.sleep(0.05)
        if pending:
            pytest.fail("redis cluster did not reach cluster_state:ok within 20 s", pytrace=False)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster(_redis_cluster_session: RedisClusterProcs) -> RedisClusterProcs:
    """A real 3-node Redis Cluster (shared by the session), flushed before each test."""
    _redis_cluster_session.flushall()
    return _redis_cluster_session


@pytest.fixture(autouse=True)
def _single_thread_torch() -> Iterator[None]:
    """Test tensors are small: on a small shared box torch's intra-op pool only adds contention
    (a 2-thread searchsorted was measured at 16 ms instead of 4 us)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
