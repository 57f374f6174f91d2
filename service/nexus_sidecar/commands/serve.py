"""``nexus-sidecar serve``: run the gRPC service and its HTTP side port."""

from __future__ import annotations

import argparse

HELP = """\
Run the eviction sidecar: gRPC data path (nexus.v1.EvictionService, grpc.health.v1, reflection)
and an HTTP side port (/healthz, /readyz, /metrics, /v1/sessions, /docs).

Settings come from flags, then NEXUS_* environment variables (e.g. NEXUS_STORE=redis://...),
then --config FILE (TOML or JSON with the same names), then defaults. With no flags it needs no
other server: the state store is in memory and everyone is tenant 'default'.

Examples:
  nexus-sidecar serve
  nexus-sidecar serve --store redis://127.0.0.1:6379/0 --checkpoint-every 8
  nexus-sidecar serve --store redis+cluster://10.0.0.5:7000 --keys-file /etc/nexus/keys
  grpcurl -plaintext localhost:50051 list
  grpcurl -plaintext -d '{"session_id":"s1","config":{"policy":"nexus","budget":256}}' \\
      localhost:50051 nexus.v1.EvictionService/OpenSession
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``serve`` parser."""
    p = sub.add_parser("serve", help="run the gRPC sidecar", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML/JSON settings file")
    p.add_argument("--grpc-host")
    p.add_argument("--grpc-port", type=int)
    p.add_argument("--uds", help="also listen on this unix socket path")
    p.add_argument("--http-host")
    p.add_argument("--http-port", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--torch-threads", type=int, help="engine intra-op threads (0 = torch default)")
    p.add_argument("--store", help="memory | redis://host:port/db | rediss://... | redis+cluster://host:port")
    p.add_argument("--store-ttl-s", type=float, help="sliding TTL of stored sessions")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (0 = on close/shutdown)")
    p.add_argument("--keys-file", help="API keys file: 'tenant key [rw|ro]' per line")
    p.add_argument("--max-batch", type=int, help="sessions per engine call")
    p.add_argument("--max-delay-us", type=int, help="longest wait for a batch to fill")
    p.add_argument("--queue-size", type=int, help="bounded step queue (RESOURCE_EXHAUSTED beyond)")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT, then drain gracefully."""
    import asyncio
    import gc
    import json
    import logging
    import signal

    from nexus_sidecar.server.app import Sidecar
    from nexus_sidecar.server.settings import load_settings

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("nexus_sidecar")
    names = ("grpc_host", "grpc_port", "uds", "http_host", "http_port", "device", "torch_threads", "store",
             "store_ttl_s",
             "checkpoint_every", "keys_file", "max_batch", "max_delay_us", "queue_size")
    settings = load_settings(args.config, **{n: getattr(args, n) for n in names})

    async def main() -> None:
        sidecar = Sidecar(settings)
        log.info("settings: %s", json.dumps(settings.redacted(), sort_keys=True))
        if sidecar.keys.single_tenant:
            log.warning("no keys file: single-tenant mode, every caller is tenant 'default' (no authentication)")
        else:
            log.info("tenants: %s", ", ".join(sidecar.keys.tenants))
        await sidecar.start()
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
