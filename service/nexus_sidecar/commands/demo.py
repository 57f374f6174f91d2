"""``nexus-sidecar demo``: the sidecar in-process, driven by simulated workers of three tenants."""

from __future__ import annotations

import argparse

from nexus_sidecar.usage import positive_int

HELP = """\
Start the sidecar in this process (memory store, three tenants with their own API keys), drive
it over real gRPC with simulated inference workers (each decoding a batch of sessions whose
attention streams carry planted subtle, bridge and strong tokens), and print what each
tenant's policy kept, the service's throughput and latency, and the sidecar's own metrics.
Finishes in well under a minute by default.
"""

TENANTS = (("acme", "nexus"), ("globex", "tova"), ("initech", "h2o"))

# Printed under the table: what each column means (the streams are bench/streams.py's).
TABLE_NOTES = """\
What the columns mean. Each tenant runs one policy on the same kind of stream: acme Nexus Sampling,
globex TOVA and initech H2O (two classic top-K baselines). Every session sees {total} tokens and may
keep {budget}; some tokens are planted:
  strong kept  tokens every query attends to ~4x more than to noise: any sensible policy keeps them
  subtle kept  tokens with the noise's median attention but a 1.46x higher mean and a high variance,
               so a single step can put one below the cut: top-K on the current step loses them
  bridge kept  tokens with *less* direct attention than noise that two strong "hub" tokens attend to
               200x more than to noise: they matter only through the hubs (what Nexus's walk scores)
  Each is the fraction of such tokens still held at the end (mean over the tenant's sessions;
  1.0 = all kept; nan = the stream was too short to contain one). evicted / retained: tokens over
  all sessions; rpc p50/p99 ms: Step RPC latency (one RPC carries one step of every session of a
  worker)."""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``demo`` parser."""
    p = sub.add_parser("demo", help="run the service against simulated workers", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers-per-tenant", type=positive_int, default=2)
    p.add_argument("--sessions", type=positive_int, default=8, help="sessions per worker (one RPC carries all)")
    p.add_argument("--prefill", type=positive_int, default=256, help="prompt tokens per session")
    p.add_argument("--steps", type=positive_int, default=160, help="decode calls per session")
    p.add_argument("--budget", type=positive_int, default=96, help="KV slots each session may keep")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo and print the tables."""
    import asyncio
    import secrets
    import statistics
    import time

    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from nexus_sidecar.bench.report import markdown_table
    from nexus_sidecar.bench.workers import SimulatedWorker, Workload
    from nexus_sidecar.server.app import Sidecar
    from nexus_sidecar.server.auth import KeyRing
    from nexus_sidecar.server.settings import ServerSettings

    keys = {t: secrets.token_hex(16) for t, _ in TENANTS}

    async def main() -> None:
        settings = ServerSettings(grpc_host="127.0.0.1", grpc_port=0, http_host="127.0.0.1", http_port=0)
        sidecar = Sidecar(settings, keys=KeyRing([(t, k, "rw") for t, k in keys.items()]))
        await sidecar.start()
        target = f"127.0.0.1:{sidecar.grpc_port}"
        print(f"sidecar up: gRPC {target}, HTTP http://127.0.0.1:{sidecar.http_port} "
              f"(device {sidecar.engine.device}, memory store, tenants {', '.join(keys)})")
        workers = []
        for t, (tenant, policy) in enumerate(TENANTS):
            work = Workload(sessions=args.sessions, prefill=args.prefill, steps=args.steps,
                            config={"policy": policy, "budget": args.budget, "seed": 7})
            workers += [SimulatedWorker(f"{tenant}-w{i}", target, tenant, keys[tenant], work, seed=100 * t + i)
                        for i in range(args.workers_per_tenant)]
        print(f"{len(workers)} workers x {args.sessions} sessions: prefill {args.prefill}, {args.steps} decode "
              f"steps each, budget {args.budget} (eviction {1 - args.budget / (args.prefill + args.steps):.0%})")
        t0 = time.perf_counter()
        stats = await asyncio.gather(*(w.run() for w in workers))
        wall = time.perf_counter() - t0
        async with httpx.AsyncClient() as http:
            metrics_text = (await http.get(f"http://127.0.0.1:{sidecar.http_port}/metrics")).text
        await sidecar.stop()

        rows = []
        for tenant, policy in TENANTS:
            mine = [s for s in stats if s.tenant == tenant]
            lat = sorted(x for s in mine for x in s.rpc_seconds)
            # A short stream can have no token of a kind yet: nan, not a crash.
            surv = {k: statistics.mean(vals) if (vals := [v for s in mine for v in s.survival.get(k, [])])
                    else float("nan") for k in ("subtle", "bridge", "strong")}
            rows.append({
                "tenant": tenant, "policy": policy, "sessions": len(mine) * args.sessions,
                "evicted": sum(s.evicted for s in mine), "retained": sum(s.retained for s in mine),
                "subtle kept": surv["subtle"], "bridge kept": surv["bridge"], "strong kept": surv["strong"],
                "rpc p50 ms": lat[len(lat) // 2] * 1e3, "rpc p99 ms": lat[int(0.99 * (len(lat) - 1))] * 1e3,
            })
        steps = sum(s.session_steps for s in stats)
        print(f"\nService: {steps} session-steps in {wall:.1f} s wall "
              f"({steps / max(s.seconds for s in stats):,.0f} session-steps/s over the decode phase), "
              f"{sum(len(s.rpc_seconds) for s in stats)} step RPCs")
        fams = {f.name: f for f in text_string_to_metric_families(metrics_text)}

        def hist_mean(name: str) -> float:
            samples = fams[name].samples
            total = sum(x.value for x in samples if x.name.endswith("_sum"))
            count = sum(x.value for x in samples if x.name.endswith("_count"))
            return total / count if count else float("nan")

        print(f"Sidecar metrics: mean batch {hist_mean('nexus_batch_sessions'):.1f} sessions, "
              f"engine {hist_mean('nexus_engine_compute_seconds') * 1e3:.2f} ms/batch, "
              f"queue wait {hist_mean('nexus_queue_wait_seconds') * 1e3:.2f} ms, "
              f"retained attention mass {hist_mean('nexus_retained_attention_mass'):.3f}")
        # The table last, with what its columns mean: it is what a first-time user came to see.
        print("\nRetention by tenant (planted tokens still held at the end of the stream):")
        print(markdown_table(rows, list(rows[0])))
        print(TABLE_NOTES.format(budget=args.budget, total=args.prefill + args.steps))

    asyncio.run(main())
    return 0
