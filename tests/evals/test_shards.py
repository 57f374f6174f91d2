"""Parallel shards: children's logs are merged once, a failing child is reported with its output and
loses nothing, and the others are stopped. The children here are small real Python processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from nexus_sidecar.evals.runner import load_done
from nexus_sidecar.evals.shards import parse_shard, run_shards, shard_log


def _child(
    log: Path, keys: list[str], exit_code: int = 0, sleep_s: float = 0.0, after: Path | None = None
) -> list[str]:
    """A child that appends ``keys`` to ``log``, waits until ``after`` (another child's log) has a line,
    up to 60 s (under load the other interpreter may not have started yet), sleeps and exits."""
    ready = f"os.path.exists({str(after)!r}) and os.path.getsize({str(after)!r}) > 0"
    wait = f"while not ({ready}) and time.time() < t0 + 60: time.sleep(0.02)\n" if after else ""
    script = (
        "import json, os, sys, time\n"
        "t0 = time.time()\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        f"    for k in {keys!r}:\n"
        "        f.write(json.dumps({'key': k}) + '\\n')\n"
        f"{wait}"
        f"time.sleep({sleep_s})\n"
        f"print('child says bye'); sys.exit({exit_code})\n"
    )
    return [sys.executable, "-c", script]


def test_parse_shard() -> None:
    assert parse_shard("0/2") == (0, 2) and parse_shard("3/4") == (3, 4)
    for bad in ("2/2", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_children_logs_are_merged_without_duplicates(tmp_path: Path) -> None:
    main_log = tmp_path / "runs.jsonl"
    main_log.write_text(json.dumps({"key": "old"}) + "\n")
    keys = {0: ["a", "b", "old"], 1: ["c"]}  # "old" is already in the main log: not duplicated
    added = run_shards(lambda k, n: _child(shard_log(main_log, k, n), keys[k]), main_log, 2, progress=False,
                       poll_s=0.05)  # fmt: skip
    assert added == 3 and sorted(load_done(main_log)) == ["a", "b", "c", "old"]
    assert len(main_log.read_text().splitlines()) == 4
    assert not list(tmp_path.glob("runs.jsonl.shard-*")), "shard logs and outputs are removed after a merge"


def test_a_failing_child_is_reported_and_its_finished_runs_are_kept(tmp_path: Path) -> None:
    main_log = tmp_path / "runs.jsonl"

    def argv(k: int, n: int) -> list[str]:
        # Shard 0 finishes two runs then fails; shard 1 would run for a minute and must be stopped.
        if k == 0:
            return _child(shard_log(main_log, k, n), ["x", "y"], exit_code=3, after=shard_log(main_log, 1, n))
        return _child(shard_log(main_log, k, n), ["z"], sleep_s=60)

    with pytest.raises(RuntimeError) as err:
        run_shards(argv, main_log, 2, progress=False, poll_s=0.05)
    msg = str(err.value)
    assert "shard 0/2 exited with 3" in msg and "child says bye" in msg
    assert sorted(load_done(main_log)) == ["x", "y", "z"]  # nothing finished is lost
    assert shard_log(main_log, 0, 2).with_name("runs.jsonl.shard-0-of-2.out").exists()  # kept for diagnosis


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by init, counts as stopped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait(cond: object, timeout_s: float = 60.0) -> bool:
    import time

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


_PARENT = """
import json, os, sys, time
from pathlib import Path
from nexus_sidecar.evals.shards import Terminated, run_shards, shard_log
main = Path(sys.argv[1])
child = (
    "import json, os, sys, time\\n"
    "with open(sys.argv[1], 'a') as f:\\n"
    "    f.write(json.dumps({'key': 'pid-%d' % os.getpid()}) + '\\\\n')\\n"
    "time.sleep(120)\\n"
)
try:
    run_shards(lambda k, n: [sys.executable, "-c", child, str(shard_log(main, k, n))], main, 2, progress=False,
               poll_s=0.05)
except Terminated as exc:
    print("terminated", exc.signum, flush=True)
    sys.exit(128 + exc.signum)
"""


def _start_parent(tmp_path: Path) -> tuple[object, Path]:
    import os
    import subprocess

    main_log = tmp_path / "runs.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(main_log)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)  # fmt: skip
    logs = [shard_log(main_log, k, 2) for k in range(2)]
    assert _wait(lambda: all(p.exists() and p.read_text().endswith("\n") for p in logs)), "children never started"
    return parent, main_log


def _pids(paths: list[Path]) -> list[int]:
    return [int(k.split("-")[1]) for p in paths for k in load_done(p)]


@pytest.mark.skipif(sys.platform != "linux", reason="/proc and PR_SET_PDEATHSIG are Linux's")
def test_sigterm_to_the_parent_stops_the_children_and_merges_their_runs(tmp_path: Path) -> None:
    import signal

    parent, main_log = _start_parent(tmp_path)
    pids = _pids([shard_log(main_log, k, 2) for k in range(2)])
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    parent.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
    out, _ = parent.communicate(timeout=60)  # type: ignore[attr-defined]
    assert parent.returncode == 128 + signal.SIGTERM, out  # type: ignore[attr-defined]
    assert b"terminated 15" in out
    assert _wait(lambda: not any(_alive(p) for p in pids), 30), "children outlived their terminated parent"
    assert sorted(load_done(main_log)) == sorted(f"pid-{p}" for p in pids)  # what they finished is merged


@pytest.mark.skipif(sys.platform != "linux", reason="/proc and PR_SET_PDEATHSIG are Linux's")
def test_a_killed_parent_takes_its_children_and_a_resumed_run_reuses_their_logs(tmp_path: Path) -> None:
    import signal

    from nexus_sidecar.evals.shards import recover_shard_logs, stale_shard_logs

    parent, main_log = _start_parent(tmp_path)
    logs = [shard_log(main_log, k, 2) for k in range(2)]
    pids = _pids(logs)
    parent.send_signal(signal.SIGKILL)  # type: ignore[attr-defined]  # no handler can run: PDEATHSIG must act
    parent.wait(timeout=60)  # type: ignore[attr-defined]
    assert _wait(lambda: not any(_alive(p) for p in pids), 30), "children outlived their killed parent"
    assert stale_shard_logs(main_log) == logs and not main_log.exists()  # nothing merged: the parent died at once
    # The resumed run, here with 3 jobs instead of 2, merges the old shards' runs before starting its children.
    seen: list[set[str]] = []

    def argv(k: int, n: int) -> list[str]:
        seen.append(set(load_done(main_log)))
        return _child(shard_log(main_log, k, n), [f"new-{k}"])

    added = run_shards(argv, main_log, 3, progress=False, poll_s=0.05)
    assert seen[0] == {f"pid-{p}" for p in pids}, "the children of the resumed run must see the old runs as done"
    want = [*(f"pid-{p}" for p in pids), "new-0", "new-1", "new-2"]
    assert added == 3 and sorted(load_done(main_log)) == sorted(want)
    assert not stale_shard_logs(main_log) and recover_shard_logs(main_log) == 0
