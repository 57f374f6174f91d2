"""What the HTTP/2 stream window costs a gRPC server per large request: gRPC's adaptive window vs fixed ones.

A bare ``grpc.aio`` server (no parsing: it answers the first 32 KiB of each request, the size of a
B = 64 StepBatch answer) in its own process, two concurrent clients on loopback sending 1 MiB
requests (a B = 64 x 4,096-slot StepBatch is ~1.0 MiB). Per variant: the server's CPU per RPC from
its threads' nanosecond clocks, and the wall time per RPC. Variants alternate round by round, so a
change of the machine's load hits all of them alike; medians over rounds.

Why it exists: an early run with the process's 10 ms tick clock suggested a fixed window cut the
server's CPU by a third; measured with nanosecond thread clocks, alternating, it does not (the
sidecar keeps gRPC's adaptive window; docs/benchmarks-service.md, round 3).

Usage::

    python benchmarks/grpc_window.py [--rounds 5] [--rpcs 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import time
from typing import Any

import grpc
from nexus_sidecar.bench.procs import free_port
from nexus_sidecar.bench.service_bench import process_cpu_seconds

METHOD = "/bench.Window/Echo"
ANSWER = 32 * 1024
LIMITS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
VARIANTS: dict[str, list[tuple[str, Any]]] = {
    "adaptive (gRPC default, the sidecar's)": [],
    "fixed 2 MiB": [("grpc.http2.lookahead_bytes", 2 << 20), ("grpc.http2.bdp_probe", 0)],
    "fixed 8 MiB": [("grpc.http2.lookahead_bytes", 8 << 20), ("grpc.http2.bdp_probe", 0)],
    "fixed 32 MiB": [("grpc.http2.lookahead_bytes", 32 << 20), ("grpc.http2.bdp_probe", 0)],
}


def _serve(port: int, options: list[tuple[str, Any]], ready: Any) -> None:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request[:ANSWER]

    async def main() -> None:
        server = grpc.aio.server(options=LIMITS + options)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "bench.Window", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


async def _drive(port: int, pid: int, rpcs: int, size: int) -> tuple[float, float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=LIMITS) as channel:
        call = channel.unary_unary(METHOD)
        payload = os.urandom(size)
        for _ in range(5):  # connection and window warm-up
            await call(payload)
        c0, t0 = process_cpu_seconds(pid), time.perf_counter()

        async def client() -> None:
            for _ in range(rpcs):
                await call(payload)

        await asyncio.gather(client(), client())
        n = 2 * rpcs
        return (process_cpu_seconds(pid) - c0) / n * 1e3, (time.perf_counter() - t0) / n * 1e3


def measure(rounds: int, rpcs: int, size: int) -> dict[str, Any]:
    """Alternate every variant ``rounds`` times; per variant the CPU and wall ms per RPC of each round."""
    ctx = mp.get_context("spawn")  # no fork after grpc has started threads
    out: dict[str, dict[str, list[float]]] = {name: {"cpu_ms": [], "wall_ms": []} for name in VARIANTS}
    for _ in range(rounds):
        for name, options in VARIANTS.items():
            port, ready = free_port(), ctx.Event()
            proc = ctx.Process(target=_serve, args=(port, options, ready), daemon=True)
            proc.start()
            try:
                if not ready.wait(30):
                    raise RuntimeError(f"{name}: the server did not start")
                cpu, wall = asyncio.run(_drive(port, proc.pid, rpcs, size))  # type: ignore[arg-type]
            finally:
                proc.kill()
                proc.join()
            out[name]["cpu_ms"].append(cpu)
            out[name]["wall_ms"].append(wall)
    return {"request_bytes": size, "answer_bytes": ANSWER, "rpcs_per_round": 2 * rpcs, "rounds": rounds,
            "load_average": os.getloadavg(), "variants": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rpcs", type=int, default=300, help="RPCs per client per round (2 clients)")
    ap.add_argument("--size", type=int, default=1 << 20, help="request bytes")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    res = measure(args.rounds, args.rpcs, args.size)
    base = statistics.median(next(iter(res["variants"].values()))["cpu_ms"])
    print(f"{args.size / 2**20:.1f} MiB requests, {res['rpcs_per_round']} RPCs per round, {args.rounds} rounds "
          f"(load average {res['load_average'][0]:.1f})")
    print("| server window | server CPU ms per RPC, median (rounds) | vs adaptive | wall ms per RPC, median |")
    print("|---|---|---|---|")
    for name, v in res["variants"].items():
        cpu = statistics.median(v["cpu_ms"])
        rounds = " / ".join(f"{x:.2f}" for x in v["cpu_ms"])
        print(f"| {name} | **{cpu:.2f}** ({rounds}) | {cpu / base:.2f} | {statistics.median(v['wall_ms']):.2f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
