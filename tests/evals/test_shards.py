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
