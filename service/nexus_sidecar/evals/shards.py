"""Parallel evaluation: the samples are dealt to worker processes, then their run logs are merged.

Each shard ``k`` of ``n`` is a child ``nexus-sidecar eval ... --shard k/n`` that takes every n-th
sample (offset k), reads the main run log to skip finished runs, and appends only to its own log
``<main>.shard-k-of-n``: no two processes ever write one file. When all children are done, their
records are appended to the main log (keys it already has are skipped) and the shard logs deleted;
the parent then writes the reports from the main log. A failed or interrupted shard loses nothing
either: what it finished is merged, and a rerun resumes.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from nexus_sidecar.evals.runner import merge_logs


def parse_shard(text: str) -> tuple[int, int]:
    """``"k/n"`` -> ``(k, n)`` with ``0 <= k < n``; ``ValueError`` naming the flag otherwise."""
    k, sep, n = text.partition("/")
    try:
        kk, nn = int(k), int(n)
    except ValueError:
        raise ValueError(f"--shard must be K/N with integers, got {text!r}") from None
    if not sep or nn < 1 or not 0 <= kk < nn:
        raise ValueError(f"--shard must be K/N with 0 <= K < N, got {text!r}")
    return kk, nn


def shard_log(main: Path, k: int, n: int) -> Path:
    """The run log shard ``k`` of ``n`` appends to."""
    return Path(f"{main}.shard-{k}-of-{n}")


def _lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no output)"


def run_shards(child_argv: Callable[[int, int], list[str]], main_log: Path, jobs: int, *,
               progress: bool = True, poll_s: float = 1.0) -> int:  # fmt: skip
    """Run ``jobs`` children (``child_argv(k, jobs)`` is each one's command line), merge their logs
    into ``main_log`` and return how many runs were added.

    Raises ``RuntimeError`` with the failed child's output tail when any child fails (after merging
    what every child finished and stopping the others).
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    logs = [shard_log(main_log, k, jobs) for k in range(jobs)]
    outs = [Path(f"{log}.out") for log in logs]
    main_log.parent.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"eval x{jobs} (new runs)", unit="run", dynamic_ncols=True)
    failed: list[int] = []
    try:
        for k in range(jobs):
            with outs[k].open("wb") as out:
                procs.append(subprocess.Popen(child_argv(k, jobs), stdout=out, stderr=subprocess.STDOUT))
        while any(p.poll() is None for p in procs):
            failed = [k for k, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed:
                break
            if bar is not None:
                bar.n = sum(_lines(log) for log in logs)
                bar.refresh()
            time.sleep(poll_s)
        failed = [k for k, p in enumerate(procs) if p.returncode not in (None, 0)]
    finally:
        for p in procs:  # on failure or Ctrl-C: stop the others (a killed run is simply redone later)
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if bar is not None:
            bar.n = sum(_lines(log) for log in logs)
            bar.close()
        added = merge_logs([log for log in logs if log.exists()], main_log)
    if failed:
        k = failed[0]
        raise RuntimeError(f"shard {k}/{jobs} exited with {procs[k].returncode}; its finished runs were merged "
                           f"into {main_log}. Output tail ({outs[k]}):\n{_tail(outs[k])}")  # fmt: skip
    for path in (*logs, *outs):
        path.unlink(missing_ok=True)
    return added
