"""Every user error of ``nexus-sidecar`` is one line on stderr naming what, where and how to fix
it, with exit code 2 and no traceback; ``--debug`` shows the traceback. Real subprocesses, as a
user runs the command."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from nexus_sidecar.commands.keys import MIN_KEY_CHARS
from nexus_sidecar.server.auth import KeyRing


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120
        ) -> subprocess.CompletedProcess[str]:
    """Run ``nexus-sidecar ARGS`` (this checkout's package) and capture its output."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    return subprocess.run([sys.executable, "-m", "nexus_sidecar.cli", *args], capture_output=True, text=True,
                          env={**clean, **(env or {})}, cwd=cwd, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit code 2, exactly one stderr line starting with ``nexus-sidecar``, no traceback; returns it."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, f"exit {proc.returncode}, stderr:\n{proc.stderr}"
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    line = lines[0]
    assert line.startswith("nexus-sidecar"), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A loopback port another process is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


SERVE = ("serve", "--grpc-host", "127.0.0.1", "--http-host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0")


def test_missing_keys_file_says_how_to_write_one(tmp_path: Path) -> None:
    line = one_line_error(cli(*SERVE, "--keys-file", "keys.txt", cwd=tmp_path), "keys.txt", "no such file",
                          "nexus-sidecar keys new")
    assert line.startswith("nexus-sidecar serve: ")


def test_short_key_names_file_and_line(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# tenants\nacme short-key\n")
    one_line_error(cli(*SERVE, "--keys-file", str(keys)), f"{keys}:2", "shorter than 16", "keys new")


def test_malformed_and_empty_keys_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("acme 0123456789abcdef0123 admin\n")
    one_line_error(cli(*SERVE, "--keys-file", str(bad)), f"{bad}:1", "tenant key [rw|ro]")
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n")  # would silently mean "no authentication": refused instead
    one_line_error(cli(*SERVE, "--keys-file", str(empty)), "no keys in it")


def test_config_file_errors(tmp_path: Path) -> None:
    one_line_error(cli(*SERVE, "--config", str(tmp_path / "nope.toml")), "nope.toml", "no such file")
    bad = tmp_path / "bad.toml"
    bad.write_text("grpc_port = \n")
    one_line_error(cli(*SERVE, "--config", str(bad)), "bad.toml", "not valid TOML", "line 1")
    typo = tmp_path / "typo.toml"
    typo.write_text("grpc_prot = 5\n")
    one_line_error(cli(*SERVE, "--config", str(typo)), "unknown setting 'grpc_prot'", "did you mean 'grpc_port'")
    big = tmp_path / "big.toml"
    big.write_text("max_batch = 100000\n")
    one_line_error(cli(*SERVE, "--config", str(big)), f"{big}: max_batch = 100000", "less than or equal to 4096")
    js = tmp_path / "s.json"
    js.write_text('{"grpc_port": ')
    one_line_error(cli(*SERVE, "--config", str(js)), "not valid JSON", "line 1")


def test_bad_values_name_their_source(tmp_path: Path) -> None:
    one_line_error(cli(*SERVE, "--grpc-port", "70000"), "--grpc-port 70000", "less than or equal to 65535")
    one_line_error(cli(*SERVE, "--grpc-port", "abc"), "--grpc-port abc", "valid integer")
    one_line_error(cli(*SERVE, "--store", "mysql://db"), "--store mysql://db", "redis://")
    one_line_error(cli(*SERVE, env={"NEXUS_STORE": "mysql://db"}), "$NEXUS_STORE=mysql://db", "redis://")
    one_line_error(cli(*SERVE, "--device", "tpu"), "--device tpu", "cuda:N")
    one_line_error(cli(*SERVE, "--checkpoint-full-every", "0"), "--checkpoint-full-every 0",
                   "greater than or equal to 1")
    one_line_error(cli(*SERVE, "--no-such-flag"), "unrecognized arguments: --no-such-flag", "--help")


def test_port_in_use(listening_port: int) -> None:
    for flag in ("--grpc-port", "--http-port"):
        one_line_error(cli(*SERVE, flag, str(listening_port)), f"127.0.0.1:{listening_port}", "in use",
                       "pick another port")


def test_cuda_device_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():  # the device machine: ask for one more device than it has
        device = f"cuda:{torch.cuda.device_count()}"
        needle = "CUDA device(s) are visible"
    else:
        device, needle = "cuda", "no CUDA device"
    one_line_error(cli(*SERVE, "--device", device), f"--device {device}", needle)


def test_generate_unknown_model() -> None:
    one_line_error(cli("generate", "--model", "nope", "--prompt", "hi"), "generate: --model 'nope'",
                   "not a known alias", "--model smollm2")
    one_line_error(cli("generate", "--threads", "0", "--prompt", "hi"), "--threads 0", ">= 1")


def test_demo_and_bench_arguments() -> None:
    one_line_error(cli("demo", "--budget", "0"), "argument --budget", "must be >= 1")
    one_line_error(cli("demo", "--sessions", "x"), "argument --sessions", "integer >= 1")
    one_line_error(cli("bench", "survival", "--seeds", "0"), "argument --seeds", "must be >= 1")
    import torch

    if not torch.cuda.is_available():
        one_line_error(cli("bench", "engine", "--quick", "--device", "cuda"), "--device cuda", "no CUDA device")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    proc = cli("--debug", *SERVE, "--keys-file", str(tmp_path / "missing"))
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "UsageError" in proc.stderr
    proc = cli(*SERVE, "--keys-file", str(tmp_path / "missing"), "--debug")  # after the subcommand too
    assert "Traceback" in proc.stderr


def test_serve_help_lists_every_setting_with_default_and_env() -> None:
    from nexus_sidecar.server.settings import ServerSettings

    proc = cli("serve", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    for name, info in ServerSettings.model_fields.items():
        flag, env = "--" + name.replace("_", "-"), "NEXUS_" + name.upper()
        assert flag in text and f"env {env})" in text, name
        if info.default is not None:
            assert f"(default: {info.default}; env {env})" in text, name
    assert "(default: 0.0.0.0; env NEXUS_GRPC_HOST)" in text
    assert "(default: 16 with a Redis store, 0 with memory; env NEXUS_CHECKPOINT_EVERY)" in text
    for group in ("network:", "engine:", "state store:", "micro-batcher:", "tenancy and limits:"):
        assert group in proc.stdout
    assert "at least 16 characters" in text and "accepted unchecked" in text


def test_startup_prints_effective_values(tmp_path: Path) -> None:
    """With Redis and no --checkpoint-every, the log shows the effective 16, not null. The store
    need not answer: the server starts not-ready, and the test stops it once the line is out."""
    cmd = [sys.executable, "-m", "nexus_sidecar.cli", *SERVE, "--store", "redis://127.0.0.1:1/0", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "settings (effective)" in line:
                break
        text = "".join(seen)
        assert '"checkpoint_every": 16' in text and '"device": "cpu"' in text, text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_keys_new_writes_a_line_the_server_accepts(tmp_path: Path) -> None:
    out = cli("keys", "new", "acme")
    assert out.returncode == 0, out.stderr
    tenant, key, scope = out.stdout.split()
    assert (tenant, scope) == ("acme", "rw") and len(key) >= MIN_KEY_CHARS + 16
    again = cli("keys", "new", "acme").stdout.split()[1]
    assert again != key  # random, not derived from the tenant
    path = tmp_path / "keys.txt"
    assert cli("keys", "new", "acme", "--file", str(path)).returncode == 0
    assert cli("keys", "new", "globex", "--ro", "--file", str(path)).returncode == 0
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    ring = KeyRing.from_file(path)  # the server's own parser
    assert ring.tenants == ["acme", "globex"]
    ro_key = path.read_text().splitlines()[1].split()[1]
    assert not ring.authenticate(f"Bearer {ro_key}").can_write
    one_line_error(cli("keys", "new", "a:b"), "TENANT 'a:b'", "':'")
    helptext = cli("keys", "--help").stdout
    assert "at least 16 characters" in helptext


def test_generate_uses_one_cpu_thread_unless_told() -> None:
    """--threads defaults to 1 on the CPU (a decode step took 4.6 s with torch's default threads on
    the busy 2-core box, 171 ms with one); it is applied before the model loads."""
    import torch
    from nexus_sidecar.cli import main

    before = torch.get_num_threads()
    try:
        for argv, expected in ((["generate", "--model", "nope", "--prompt", "x"], 1),
                               (["generate", "--model", "nope", "--prompt", "x", "--threads", "2"], 2)):
            torch.set_num_threads(3)
            with pytest.raises(SystemExit, match="--model 'nope'"):  # fails at the model, after the threads
                main(argv)
            assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)
