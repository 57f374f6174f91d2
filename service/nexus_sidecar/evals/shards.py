"""Parallel evaluation: the samples are dealt to worker processes, then their run logs are merged.

Each shard ``k`` of ``n`` is a child ``nexus-sidecar eval ... --shard k/n`` that takes every n-th
sample (offset k), reads the main run log to skip finished runs, and appends only to its own log
``<main>.shard-k-of-n``: no two processes ever write one file. When all children are done, their
records are appended to the main log (keys it already has are skipped) and the shard logs deleted;
the parent then writes the reports from the main log. A failed or interrupted shard loses nothing
either: what it finished is merged, and a rerun resumes.

The children stop with the parent: a SIGTERM/SIGHUP/SIGINT to the parent stops them and merges
what they finished (the parent's handler raises :class:`Terminated` and the cleanup runs), and on
Linux each child asks the kernel for a SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), which
covers a parent killed by SIGKILL or a crash. Shard logs an interrupted parent could not merge
(any ``K`` of any ``N``) are merged by the next run before it starts, so a resumed run, with the
same or another ``--jobs``, reuses every run they finished.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import signal
import subprocess
import sys
import threading
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


class Terminated(Exception):
    """The parent received a termination signal (its number in ``signum``) while running shards."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum} ({signal.Signals(signum).name})")
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to send this process SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG


def stale_shard_logs(main: Path) -> list[Path]:
    """Shard logs of ``main`` left by an interrupted parent (any K of any N), oldest layout first."""
    pattern = re.compile(re.escape(main.name) + r"\.shard-\d+-of-\d+")
    return sorted(p for p in main.parent.glob(f"{main.name}.shard-*-of-*") if pattern.fullmatch(p.name))


def recover_shard_logs(main: Path) -> int:
    """Merge the runs of stale shard logs into ``main``, then remove them (and their ``.out``); returns
    how many runs were added. A resumed run calls this first, so nothing an interrupted run finished is redone."""
    stale = stale_shard_logs(main)
    if not stale:
        return 0
    main.parent.mkdir(parents=True, exist_ok=True)
    added = merge_logs(stale, main)
    for path in stale:
        path.unlink(missing_ok=True)
        Path(f"{path}.out").unlink(missing_ok=True)
    return added


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

    Shard logs a previous, interrupted parent left behind are merged first (:func:`recover_shard_logs`).
    Raises ``RuntimeError`` with the failed child's output tail when any child fails (after merging
    what every child finished and stopping the others), and :class:`Terminated` when the parent gets
    SIGTERM, SIGHUP or SIGINT (after the same cleanup). Installs its signal handlers only when called
    from the main thread (Python's rule), restoring the previous ones on return.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    recover_shard_logs(main_log)
    logs = [shard_log(main_log, k, jobs) for k in range(jobs)]
    outs = [Path(f"{log}.out") for log in logs]
    main_log.parent.mkdir(parents=True, exist_ok=True)
    previous: dict[int, object] = {}

    def stop(signum: int, frame: object) -> None:
        raise Terminated(signum)

    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, stop)
    procs: list[subprocess.Popen[bytes]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"eval x{jobs} (new runs)", unit="run", dynamic_ncols=True)
    failed: list[int] = []
    try:
        for k in range(jobs):
            with outs[k].open("wb") as out:
                die = _die_with_parent if sys.platform == "linux" else None
                procs.append(subprocess.Popen(child_argv(k, jobs), stdout=out, stderr=subprocess.STDOUT,
                                              preexec_fn=die))  # fmt: skip
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
        # On failure, Ctrl-C or a termination signal: stop the others (a killed run is simply redone later).
        # A second signal during this cleanup must not abandon it, so the handlers ignore them now.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        try:
            for p in procs:
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
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)  # type: ignore[arg-type]
    if failed:
        k = failed[0]
        raise RuntimeError(f"shard {k}/{jobs} exited with {procs[k].returncode}; its finished runs were merged "
                           f"into {main_log}. Output tail ({outs[k]}):\n{_tail(outs[k])}")  # fmt: skip
    for path in (*logs, *outs):
        path.unlink(missing_ok=True)
    return added
