"""``nexus-sidecar bench``: the benchmarks (each writes JSON, a markdown table and a PNG plot)."""

from __future__ import annotations

import argparse

from nexus_sidecar.usage import check_cuda_device, positive_int

HELP = """\
Benchmarks. Each prints a table, and with --json PATH writes PATH, PATH.md (table) and a PNG.

  survival  which planted tokens (subtle, bridge, strong; with --scenario needle also stale and
            needle) each policy still holds at the end of synthetic attention streams, at 80% and
            90% eviction, with 95% CIs over seeds
  sweep     the same for nexus, one knob at a time around the defaults (how the defaults were chosen)
  engine    time per batched engine call and session-steps/s across B, N, F, R for every policy
  service   end-to-end gRPC throughput and latency against a bare gRPC echo and the engine alone
  checkpoint  checkpoint bytes per step and engine-thread time, before (full snapshots on the
            engine thread) and after (row copies, deltas, encoding on the checkpoint thread)
  soak      several tenants' workers against one serve process for --duration seconds: errors by
            code, p50/p99 and RSS over time, RSS growth after warm-up. With --faults (10 minutes by
            default): Redis paused, killed and restarted on its AOF, a replica killed and replaced, a
            stale replica probed; every answer checked against an in-process engine, the /metrics
            view of each fault recorded (docs/operations-soak.md)
  worker    a decoding worker's step time vs dense (SmolLM2): in-process, remote blocking and remote
            pipelined, k = 1, 4, 16 tokens per call, the sidecar's answers held 0/20/100 ms by a
            loopback proxy; and the summary's cost per call (q/k/v vs eager capture) at 512/2k/4k
            cached tokens (--quick: under 10 minutes)
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``bench`` parser and its sub-benchmarks."""
    p = sub.add_parser("bench", help="run a benchmark", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    inner = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, summary in (("survival", "survival of planted tokens per policy"),
                          ("sweep", "nexus knob sweep on the survival streams"),
                          ("engine", "engine cost per batched call"),
                          ("service", "end-to-end gRPC service throughput/latency"),
                          ("checkpoint", "checkpoint bytes and engine-thread time, before/after"),
                          ("soak", "tenants x workers against one serve process for a while"),
                          ("worker", "decode step time vs dense: local, blocking, pipelined; summary cost")):
        q = inner.add_parser(name, help=summary)
        q.add_argument("--quick", action="store_true", help="a small grid that finishes fast (CI-adjacent)")
        q.add_argument("--json", help="write results here (plus .md and .png next to it)")
        q.add_argument("--no-progress", action="store_true")
        q.add_argument("--threads", type=positive_int,
                       help="torch intra-op threads (default: torch's choice; use 1 on a shared machine, where "
                            "spinning OpenMP threads cost 10x)")
        if name in ("survival", "sweep"):
            q.add_argument("--seeds", type=positive_int, help="streams (sessions) per setting")
            q.add_argument("--length", type=positive_int, help="tokens per stream")
            q.add_argument("--scenario", choices=("stationary", "needle"), default="stationary",
                           help="stream generator: stationary (subtle, bridge, strong tokens) or needle (also "
                                "needles nothing attends to until their question, a topic shift, and the "
                                "query-agnostic priors)")
        if name == "soak":
            q.add_argument("--duration", type=positive_int, help="seconds (default 60; 600 with --faults)")
            q.add_argument("--redis", action="store_true", help="a real redis-server as the store")
            q.add_argument("--faults", action="store_true",
                           help="the fault soak: Redis (with an AOF) and two replicas, faults injected in a cycle, "
                                "every answer compared with an in-process engine")
        if name == "service":
            q.add_argument("--profile", metavar="DIR",
                           help="also py-spy the server over the B = 64 decode windows: raw samples in DIR, a summary "
                                "(CPU, GIL wait, idle per thread; where the CPU goes) after the table")
            q.add_argument("--device", default="auto",
                           help="the server's engine device and the engine-alone reference's: auto (CUDA if present), "
                                "cpu, cuda")
        if name == "engine":
            q.add_argument("--device", action="append", help="cpu, cuda (repeatable; default: cpu + cuda if present)")
            q.add_argument("--contended", action="store_true",
                           help="the convoy benchmark instead: one Nexus call (B=64, N=4096) alone and beside a "
                                "thread running Python, fused and torch kernels (goal: <= 1.5x alone)")
        q.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen benchmark and write its outputs."""
    from pathlib import Path

    from nexus_sidecar.bench.report import write_outputs

    progress = not args.no_progress
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.bench in ("survival", "sweep"):
        from nexus_sidecar.bench import survival as mod

        settings = mod.SurvivalSettings(length=512 if args.quick else 1024, seeds=4 if args.quick else 16,
                                        scenario=args.scenario)
        if args.seeds:
            settings.seeds = args.seeds
        if args.length:
            settings.length = args.length
        payload = mod.run(settings, progress) if args.bench == "survival" else mod.sweep(settings, progress=progress)
        table = mod.table(payload) if args.bench == "survival" else mod.sweep_table(payload)
        plot = mod.plot if args.bench == "survival" else None
    elif args.bench == "engine":
        import torch

        from nexus_sidecar.bench import engine_bench as mod

        devices = tuple(args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]))
        for device in devices:
            check_cuda_device("--device", device)
        if args.contended:
            c = mod.ContendedSettings(rounds=5, kernels=("fused",)) if args.quick else mod.ContendedSettings()
            payload = mod.contended(c, progress)
            table, plot = mod.contended_table(payload), None
        elif args.quick:
            settings = mod.EngineBenchSettings(batch_sizes=(1, 64), slots=(4096,), fanouts=(8,), iterations=(2,),
                                               calls=9, warmup=2, devices=devices)
        else:
            settings = mod.EngineBenchSettings(devices=devices)
        if not args.contended:
            payload = mod.run(settings, progress)
            table, plot = mod.table(payload), mod.plot
    elif args.bench == "soak":
        if args.faults:
            from nexus_sidecar.bench import soak_faults as faults

            fs = faults.FaultSoakSettings(duration_s=float(args.duration or 600))
            if args.quick:
                fs.tenants, fs.workers_per_tenant, fs.sessions, fs.cycle_s = 2, 2, 2, fs.duration_s
            payload = faults.run(fs, progress)
            table, plot = faults.table(payload), None
        else:
            from nexus_sidecar.bench import soak as mod

            settings = mod.SoakSettings(duration_s=float(args.duration or 60), redis=args.redis)
            if args.quick:
                settings.tenants, settings.workers_per_tenant, settings.window_s = 2, 1, 2.0
            payload = mod.run(settings, progress)
            table, plot = mod.table(payload), mod.plot
    elif args.bench == "worker":
        from nexus_sidecar.bench import worker_bench as mod

        settings = mod.WorkerBenchSettings.quick() if args.quick else mod.WorkerBenchSettings()
        payload = mod.run(settings, progress, threads=args.threads or 1)
        table, plot = mod.table(payload), None
    elif args.bench == "checkpoint":
        from nexus_sidecar.bench import checkpoint_bench as mod

        settings = mod.CheckpointBenchSettings.quick() if args.quick else mod.CheckpointBenchSettings()
        payload = mod.run(settings, progress)
        table, plot = mod.table(payload), None
    else:
        from nexus_sidecar.bench import service_bench as mod

        if args.device != "auto":
            check_cuda_device("--device", args.device)
        settings = mod.ServiceBenchSettings.quick() if args.quick else mod.ServiceBenchSettings()
        settings.device = args.device
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            settings.profile_dir = args.profile
        payload = mod.run(settings, progress)
        table, plot = mod.table(payload), mod.plot
    print(table)
    if args.json:
        path, md = write_outputs(args.json, payload, table)
        if plot is not None:
            plot(payload, str(Path(path).with_suffix(".png")))
        print(f"wrote {path}, {md}")
    return 0
