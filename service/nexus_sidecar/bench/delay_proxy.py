"""A loopback TCP proxy that holds every byte the upstream sends back for a fixed delay.

A slow sidecar for benchmarks and tests, made for real: the worker talks gRPC to the proxy, the
proxy forwards requests at once and releases each chunk of the sidecar's responses ``delay_s``
after it arrived (order kept). Nothing in the product sleeps. Threads only (one accept loop, three
per connection), all daemons, all stopped by :meth:`DelayProxy.close` (a context manager).
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Callable

__all__ = ["DelayProxy"]

_CHUNK = 1 << 16


class DelayProxy:
    """Listen on ``127.0.0.1:<free port>``, forward to ``upstream`` (``host:port``); responses held ``delay_s``."""

    def __init__(self, upstream: str, delay_s: float) -> None:
        host, _, port = upstream.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"upstream: expected host:port, got {upstream!r}")
        if delay_s < 0:
            raise ValueError(f"delay_s: must be >= 0, got {delay_s}")
        self.upstream = (host, int(port))
        self.delay_s = delay_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept)

    @property
    def target(self) -> str:
        """``host:port`` to give the client."""
        return f"127.0.0.1:{self.port}"

    def _spawn(self, fn: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True, name="delay-proxy")
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, server]
            held: queue.Queue[tuple[float, bytes] | None] = queue.Queue()
            self._spawn(self._pump, client, server)  # requests: at once
            self._spawn(self._hold, server, held)  # responses: stamped on arrival...
            self._spawn(self._release, held, client)  # ...and released delay_s later

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(_CHUNK):
                dst.sendall(data)
        self._shut(dst)

    def _hold(self, src: socket.socket, held: queue.Queue[tuple[float, bytes] | None]) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(_CHUNK):
                held.put((time.monotonic() + self.delay_s, data))
        held.put(None)

    def _release(self, held: queue.Queue[tuple[float, bytes] | None], dst: socket.socket) -> None:
        while (item := held.get()) is not None:
            due, data = item
            wait = due - time.monotonic()
            if wait > 0 and self._closed.wait(wait):
                return
            try:
                dst.sendall(data)
            except OSError:
                return
        self._shut(dst)

    @staticmethod
    def _shut(s: socket.socket) -> None:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Stop accepting, drop every connection, and join the threads (bounded)."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept loop (Linux)
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
        for t in self._threads:
            t.join(timeout=2.0)

    def __enter__(self) -> DelayProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
