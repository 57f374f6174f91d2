"""Where the server's CPU goes: py-spy samples of the sidecar process, summarised per thread.

``py-spy record --native --threads --idle --format raw`` samples every thread's stack, Python and
native frames, at a fixed rate (blocking: the process is paused for each sample, so its figures
are shares, not absolute times). Each sample is classified:

- ``gil_wait``: the thread waits to re-take the GIL (``take_gil``, or a ``pthread_cond_timedwait``
  right under a C call that released the GIL: CPython inlines ``take_gil``);
- ``idle``: the thread waits for work (epoll, a queue, a condition variable);
- ``cpu``: anything else, attributed to the innermost frame of our own code (``nexus_sidecar``,
  ``nexus_client``), else to the innermost Python frame (the event loop running gRPC's transport
  and protobuf callbacks, asyncio), else native.

``python -m nexus_sidecar.bench.server_profile RAW`` prints the summary of a raw file.
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
from typing import Any

from nexus_sidecar.bench.report import markdown_table

_IDLE = ("epoll_wait", "_queuemodule", "thread.py:81", "sem_wait", "sem_timedwait", "clock_nanosleep")
_OURS = ("nexus_sidecar/", "nexus_client/")
_ENTRY = ("commands/serve.py", "nexus_sidecar/cli.py")  # the process entry: frames under it are the event loop


def start(pid: int, out: str, rate: int = 100) -> subprocess.Popen[bytes]:
    """Start sampling ``pid`` into ``out`` (raw); stop with :func:`stop`."""
    exe = shutil.which("py-spy")
    if exe is None:
        raise RuntimeError("py-spy not found: pip install py-spy (it is in the [dev] extra)")
    return subprocess.Popen([exe, "record", "-p", str(pid), "--native", "--threads", "--idle", "-r", str(rate),
                             "-f", "raw", "-o", out, "-d", "3600"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop sampling (py-spy writes its file on SIGINT)."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def classify(frames: list[str]) -> str:
    """``gil_wait``, ``idle`` or ``cpu`` for one sampled stack (outermost frame first)."""
    stack = ";".join(frames)
    if "take_gil" in stack:
        return "gil_wait"
    if any(mark in stack for mark in _IDLE) and "_WorkItem.run" not in stack:
        return "idle"
    if "pthread_cond_timedwait" in frames[-1] or (len(frames) > 1 and "pthread_cond_timedwait" in frames[-2]):
        return "gil_wait"
    if "pthread_cond_wait" in stack:
        return "idle"
    return "cpu"


def where(frames: list[str]) -> str:
    """The frame a CPU sample is charged to."""
    py = [f for f in frames if re.search(r"\.py:\d+\)", f)]
    ours = [f for f in py if any(o in f for o in _OURS) and not any(e in f for e in _ENTRY)]
    if ours:
        return re.sub(r":\d+\)$", ")", ours[-1])
    # Outside our code: the event loop running gRPC's callbacks (transport, protobuf), asyncio.
    return "event loop / gRPC: " + re.sub(r":\d+\)$", ")", py[-1] if py else frames[-1])


def summarize(path: str, top: int = 12) -> dict[str, Any]:
    """Per thread: samples by class, and the functions the CPU samples are charged to."""
    kinds: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    funcs: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            frames = stack.split(";")
            thread = re.sub(r"^thread \(\w+\):?\s*", "", frames[0]).strip() or frames[0]
            thread = re.sub(r"_\d+$", "", thread)  # executor threads: nexus-engine_0 -> nexus-engine
            kind = classify(frames[1:] or frames)
            n = int(count)
            kinds[thread][kind] += n
            if kind != "idle":
                funcs[thread][f"{kind}: {where(frames[1:] or frames)}"] += n
    threads = []
    for thread, c in sorted(kinds.items(), key=lambda kv: -(kv[1]["cpu"] + kv[1]["gil_wait"])):
        total = sum(c.values())
        busy = c["cpu"] + c["gil_wait"]
        threads.append({"thread": thread, "samples": total, "cpu_share": c["cpu"] / total,
                        "gil_wait_share": c["gil_wait"] / total, "idle_share": c["idle"] / total,
                        "top": [{"where": w, "share_of_busy": n / max(1, busy)}
                                for w, n in funcs[thread].most_common(top)]})
    return {"threads": threads}


def table(summary: dict[str, Any]) -> str:
    """Markdown: one line per thread, then each busy thread's top frames."""
    out = [markdown_table(summary["threads"], ["thread", "samples", "cpu_share", "gil_wait_share", "idle_share"])]
    for t in summary["threads"]:
        if t["cpu_share"] + t["gil_wait_share"] < 0.01:
            continue
        out.append(f"\n{t['thread']} (busy {100 * (t['cpu_share'] + t['gil_wait_share']):.0f}% of samples):\n")
        out.append(markdown_table(t["top"], ["where", "share_of_busy"]))
    return "\n".join(out)


if __name__ == "__main__":
    print(table(summarize(sys.argv[1])))
