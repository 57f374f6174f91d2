"""``nexus-sidecar generate --engine llamacpp`` as a user runs it: the answer, then the line with the
policy calls, the tokens evicted and the largest KV cache read from llama.cpp; and the refusals."""

from __future__ import annotations

import re
from pathlib import Path

from tests.client.conftest import FILLER, passkey_prompt, require_smollm2
from tests.commands.test_cli_errors import cli, one_line_error

require_smollm2()


def _generate_passkey(tmp_path: Path, *flags: str) -> str:
    """``generate --engine llamacpp`` (Nexus, budget 96, 8 new tokens) on a pass-key prompt; its stdout,
    whose first line must be the pass key."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(passkey_prompt(62851, FILLER[0], 30))
    proc = cli("generate", "--engine", "llamacpp", "--model", "smollm2", "--policy", "nexus", "--budget", "96",
               "--prompt-file", str(prompt), "--max-new-tokens", "8", "--threads", "1", *flags, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].lstrip().startswith("62851"), proc.stdout
    return proc.stdout


def test_generate_prints_answer_and_engine_cache(tmp_path: Path) -> None:
    out = _generate_passkey(tmp_path, "--chunk-size", "128")
    m = re.search(r"prompt (\d+) tokens, generated (\d+); policy calls (\d+), tokens evicted (\d+); engine KV cache "
                  r"largest (\d+) cells \(read from llama\.cpp", out)
    assert m, out
    prompt_tokens, generated, calls, evicted, largest = map(int, m.groups())
    assert generated == 8 and calls >= -(-prompt_tokens // 128)
    assert evicted >= prompt_tokens - 96 and 96 < largest <= 96 + 128


def test_generate_refuses_per_layer_groups_on_llamacpp(tmp_path: Path) -> None:
    proc = cli("generate", "--engine", "llamacpp", "--groups", "layer", "--prompt", "hi")
    one_line_error(proc, "--groups layer", "llama_memory_seq_rm")


def test_generate_pipelined_holds_the_pipelined_bound(tmp_path: Path) -> None:
    """``--pipeline``: each answer applied right before the next call; the cache read from llama.cpp
    peaks within budget + slack + 2 x chunk (the next chunk arrives before the answer lands)."""
    out = _generate_passkey(tmp_path, "--chunk-size", "64", "--every", "4", "--pipeline")
    m = re.search(r"policy calls (\d+), tokens evicted (\d+); engine KV cache largest (\d+) cells \(read from "
                  r"llama\.cpp; bound budget 96 \+ slack 0 \+ 2 x chunk 64, pipelined\)", out)
    assert m, out
    calls, evicted, largest = map(int, m.groups())
    assert calls > 4 and evicted > 0 and 96 + 64 < largest <= 96 + 2 * 64
    assert "pipelined, waited" in out
