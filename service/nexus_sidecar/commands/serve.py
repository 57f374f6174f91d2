"""``nexus-sidecar serve``: run the gRPC service and its HTTP side port."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from nexus_sidecar.settings_cli import add_setting_flags, effective, settings_from_args
from nexus_sidecar.usage import UsageError, check_cuda_device

if TYPE_CHECKING:
    from nexus_sidecar.server.auth import KeyRing
    from nexus_sidecar.server.settings import ServerSettings

HELP = """\
Run the eviction sidecar: gRPC data path (nexus.v1.EvictionService, grpc.health.v1, reflection)
and an HTTP side port (/healthz, /readyz, /metrics, /v1/sessions, /ui/sessions/ID, /docs).

Settings come from flags, then NEXUS_* environment variables (e.g. NEXUS_STORE=redis://...),
then --config FILE (TOML, or JSON, with the names below, '_' for '-'), then defaults. With no
flags it needs no other server: the state store is in memory and, with no --keys-file, everyone
is tenant 'default' (no authentication: any 'authorization' header is accepted unchecked).

Examples:
  nexus-sidecar serve
  nexus-sidecar keys new acme >> keys.txt      # a keys-file line with a strong random key
  nexus-sidecar serve --store redis://127.0.0.1:6379/0 --checkpoint-every 8 --keys-file keys.txt
  nexus-sidecar serve --store redis+cluster://10.0.0.5:7000 --keys-file /etc/nexus/keys
  grpcurl -plaintext localhost:50051 list
  grpcurl -plaintext -d '{"session_id":"s1","config":{"policy":"nexus","budget":256}}' \\
      localhost:50051 nexus.v1.EvictionService/OpenSession
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``serve`` parser: one flag per settings field, grouped, with defaults and env names."""
    p = sub.add_parser("serve", help="run the gRPC sidecar", description=HELP,
                       usage="nexus-sidecar serve [--config FILE] [--log-level LEVEL] [--SETTING VALUE ...]",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="TOML (*.toml) or JSON settings file")
    p.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="(default: INFO)")
    add_setting_flags(p)
    p.set_defaults(func=run)


def load_keys(settings: ServerSettings) -> KeyRing:
    """The API keys (or single-tenant mode); a bad keys file is a one-line :class:`UsageError`."""
    from nexus_sidecar.server.auth import KeyRing

    path = settings.keys_file
    if path is None:
        return KeyRing()
    fix = (f"each line is 'tenant key [rw|ro]' with a key of at least 16 characters; "
           f"`nexus-sidecar keys new TENANT >> {path}` writes one")
    if not Path(path).is_file():
        raise UsageError(f"keys file {path}: no such file; create it with `nexus-sidecar keys new TENANT > {path}`")
    try:
        ring = KeyRing.from_file(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"keys file {path}: cannot read it ({exc})") from None
    except ValueError as exc:  # the parser names path:line; InvalidId names the bad character
        where = str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}"
        raise UsageError(f"keys file {where}; {fix}") from None
    if ring.single_tenant:
        raise UsageError(f"keys file {path}: no keys in it; {fix}")
    return ring


def check_device(device: str) -> None:
    """``--device``: auto, cpu, or a CUDA device torch can see."""
    check_cuda_device("--device", device)


def check_ports(settings: ServerSettings) -> None:
    """Each fixed port can be bound now: a taken port is one line here, not a gRPC core log line
    and a uvicorn exit code later (a race with another process remains, and is caught at bind)."""
    import socket

    for flags, host, port in (("--grpc-host/--grpc-port", settings.grpc_host, settings.grpc_port),
                              ("--http-host/--http-port", settings.http_host, settings.http_port)):
        if not port:
            continue
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is fine
                probe.bind((host, port))
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise UsageError(f"{flags} {host}:{port}: cannot listen there ({reason}); pick another port "
                             "(0 = any free one) or an address of this machine") from None


def _bind_error(exc: BaseException, settings: ServerSettings) -> UsageError | None:
    """A port that cannot be bound, as a user error naming it (None for any other failure)."""
    text = str(exc)
    if isinstance(exc, RuntimeError) and "bind" in text.lower():
        where = f"--grpc-host/--grpc-port {settings.grpc_host}:{settings.grpc_port}"
    elif isinstance(exc, OSError | SystemExit):  # uvicorn exits(1) after logging the bind error
        where = f"--http-host/--http-port {settings.http_host}:{settings.http_port}"
    else:
        return None
    return UsageError(f"{where}: cannot listen there (in use, or not an address of this machine); "
                      "pick another port (0 = any free one) or host")


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT, then drain gracefully."""
    import asyncio
    import gc
    import json
    import logging
    import signal

    # Every user error is found before the heavy imports (torch, grpc, fastapi): it answers at once.
    settings = settings_from_args(args)
    keys = load_keys(settings)
    check_device(settings.device)
    check_ports(settings)

    import torch

    from nexus_sidecar.server.app import Sidecar
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("nexus_sidecar")
    # uvicorn logs a bind failure itself before exiting; the one-line UsageError says it instead.
    logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)

    async def main() -> None:
        sidecar = Sidecar(settings, keys=keys)
        values = effective(settings, device=str(sidecar.engine.device), torch_threads=torch.get_num_threads())
        log.info("settings (effective): %s", json.dumps(values, sort_keys=True))
        if sidecar.keys.single_tenant:
            log.warning("no keys file: single-tenant mode, every caller is tenant 'default' and any "
                        "'authorization' header is accepted unchecked (no authentication)")
        else:
            log.info("tenants: %s", ", ".join(sidecar.keys.tenants))
        try:
            await sidecar.start()
        except (RuntimeError, OSError, SystemExit) as exc:
            err = _bind_error(exc, settings)
            await sidecar.stop(grace=0)
            if err is None:
                raise
            raise err from None
        # Move the start-up heap (torch, grpc, fastapi: millions of objects) out of the cyclic GC's
        # reach; otherwise a full collection stalls a decode step by ~150 ms every few dozen steps.
        gc.freeze()
        log.info("serving gRPC on %s:%d, HTTP on %s:%d, device %s, store %s", settings.grpc_host, sidecar.grpc_port,
                 settings.http_host, sidecar.http_port, sidecar.engine.device, settings.redacted()["store"])
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("draining: finishing in-flight steps and checkpointing dirty sessions")
        await sidecar.stop()
        log.info("stopped")

    asyncio.run(main())
    return 0
