"""Pipelined policy calls (PolicyRun(pipeline=True)): the bound on the cache at every call, the same
decisions in-process and through a real (slow) sidecar, and errors with a call in flight."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from nexus_client.client import ClientOptions
from nexus_client.errors import Unavailable
from nexus_client.hf import LocalBackend, PolicyRun, generate
from nexus_client.hf.cache_surgery import cache_lengths
from nexus_client.hf.capture import QueryRecorder, attention_modules, capture_queries
from nexus_client.hf.remote import RemoteBackend
from nexus_sidecar.bench.delay_proxy import DelayProxy
from nexus_sidecar.bench.procs import SidecarProc, sidecar_process

from tests.client.conftest import tiny_llama

PROMPT = [int(x) for x in torch.randint(3, 128, (70,), generator=torch.Generator().manual_seed(5))]
BUDGET, CHUNK = 24, 16


@pytest.fixture(scope="module")
def tiny() -> Any:
    return tiny_llama()


@pytest.fixture(scope="module")
def sidecar() -> Iterator[SidecarProc]:
    with sidecar_process("--store", "memory", "--device", "cpu", "--max-delay-us", "0") as proc:
        yield proc


def _cfg(k: int, groups: int = 1) -> dict[str, Any]:
    return dict(policy="nexus", budget=BUDGET, slack=k, sinks=2, recent=4, groups=groups, fanout=4, seed=7)


def _run(model: Any, backend: Any, k: int, groups: int = 1, pipeline: bool = True) -> Any:
    return generate(model, None, PROMPT, backend, _cfg(k, groups), max_new_tokens=30, every_k=k, chunk_size=CHUNK,
                    pipeline=pipeline)


@pytest.mark.parametrize("groups", [1, 2], ids=["shared", "per-layer"])
@pytest.mark.parametrize("k", [1, 4])
def test_the_cache_holds_budget_slack_k_at_every_call(tiny: Any, groups: int, k: int) -> None:
    res = _run(tiny, LocalBackend(), k, groups)
    held = res.timings["cache_at_call"]
    n_prefill = -(-len(PROMPT) // CHUNK)
    assert len(held) == res.policy_calls and res.policy_calls > n_prefill + 3
    # Every call: what the sidecar allowed (budget + slack) plus the tokens added since that call.
    assert max(held[:n_prefill]) <= BUDGET + k + CHUNK
    assert max(held[n_prefill:]) <= BUDGET + k + k, held
    # Between calls the next k tokens arrive before the answer lands: the peak is budget + slack + 2k.
    decode_sizes = [size for step, size in res.cache_sizes_over_time if step >= 1]
    assert max(decode_sizes) <= BUDGET + k + 2 * k and max(decode_sizes) > BUDGET + k  # it really overlapped
    assert len(res.token_ids) == 30 and sum(e.count for e in res.evictions) > 0


def test_pipelined_decisions_lag_by_one_call(tiny: Any) -> None:
    """The first call's answer is applied at the second call: no eviction is reported by the first."""
    pipe, block = _run(tiny, LocalBackend(), 4), _run(tiny, LocalBackend(), 4, pipeline=False)
    assert pipe.policy_calls > 0 and block.policy_calls > 0
    first_pipe = min(e.step for e in pipe.evictions)
    first_block = min(e.step for e in block.evictions)
    assert first_pipe == first_block + 1  # prefill chunk c's answer lands at chunk c + 1
    assert pipe.token_ids != [] and block.token_ids != []


@pytest.mark.parametrize("groups", [1, 2], ids=["shared", "per-layer"])
def test_a_slow_sidecar_decides_exactly_like_the_engine_in_process(tiny: Any, sidecar: SidecarProc,
                                                                   groups: int) -> None:
    """Through a loopback proxy holding every response 30 ms: same evictions, tokens, bounds."""
    local = _run(tiny, LocalBackend(), 4, groups)
    with DelayProxy(sidecar.target, 0.03) as proxy, RemoteBackend(proxy.target, session_prefix=f"pipe-{groups}") as rb:
        remote = _run(tiny, rb, 4, groups)
        assert rb.calls == remote.policy_calls and rb.local_calls == 0
    assert [(e.phase, e.step, e.positions) for e in remote.evictions] == \
        [(e.phase, e.step, e.positions) for e in local.evictions]  # fmt: skip
    assert remote.token_ids == local.token_ids
    assert remote.timings["cache_at_call"] == local.timings["cache_at_call"]


def _step(model: Any, cache: Any, rec: QueryRecorder, run: PolicyRun, slots: list[torch.Tensor],
          tokens: torch.Tensor, start: int) -> int:
    pos = torch.arange(start, start + tokens.numel())
    model(input_ids=tokens[None], position_ids=pos[None], past_key_values=cache, use_cache=True)
    slots[0] = torch.cat([slots[0], pos])
    run.add(rec.take(), pos, slots)
    return start + tokens.numel()


@torch.inference_mode()
def test_a_sidecar_killed_with_a_call_in_flight_falls_back_locally(tiny: Any, tmp_path: Any) -> None:
    from transformers import DynamicCache

    rec = QueryRecorder(len(attention_modules(tiny)))
    cache = DynamicCache(config=tiny.config)
    slots = [torch.empty(0, dtype=torch.int64)]
    ids = torch.tensor(PROMPT)
    with sidecar_process("--store", "memory", "--device", "cpu", log_path=tmp_path / "s.log") as proc, \
            capture_queries(tiny, rec):  # fmt: skip
        backend = RemoteBackend(ClientOptions(proc.target, timeout_s=2.0), fallback="streaming",
                                fallback_after_s=0.5, probe_every_s=0.5)
        run = PolicyRun(backend, _cfg(4), pipeline=True)
        nxt = 0
        for chunk in ids.split(CHUNK):
            nxt = _step(tiny, cache, rec, run, slots, chunk, nxt)
            run.call(cache, slots, "context")
            assert max(cache_lengths(cache)) <= BUDGET + 4 + CHUNK
        proc.proc.kill()  # the last chunk's call may be in flight or answered: either way the next fails over
        proc.proc.wait(timeout=10)
        for step in range(12):
            nxt = _step(tiny, cache, rec, run, slots, torch.tensor([3 + step]), nxt)
            if run.pending >= 4:
                run.call(cache, slots, "decode")
                assert max(cache_lengths(cache)) <= BUDGET + 4 + 4
        assert backend.local_calls >= 2 and run.calls == 5 + 3
        assert cache_lengths(cache)[0] == slots[0].numel()  # the cache and the slot list agree
        with pytest.raises(Unavailable):  # closing the sidecar session needs the sidecar
            run.close()
        backend.shutdown()


@torch.inference_mode()
def test_an_unreachable_sidecar_surfaces_at_the_next_call(tiny: Any) -> None:
    """fallback="wait" (no local decisions): the error of the call in flight is raised by the call
    that collects it, and nothing is cut from the cache."""
    from transformers import DynamicCache

    rec = QueryRecorder(len(attention_modules(tiny)))
    cache = DynamicCache(config=tiny.config)
    slots = [torch.empty(0, dtype=torch.int64)]
    with sidecar_process("--store", "memory", "--device", "cpu") as proc, DelayProxy(proc.target, 0.0) as proxy:
        backend = RemoteBackend(ClientOptions(proxy.target, timeout_s=1.0, retries=0, retry_budget_s=1.0))
        run = PolicyRun(backend, _cfg(4), pipeline=True)
        with capture_queries(tiny, rec):
            nxt = _step(tiny, cache, rec, run, slots, torch.tensor(PROMPT[:40]), 0)
            run.call(cache, slots, "context")
            run.drain(cache, slots)  # answer 1 applied: 40 -> 24 slots
            assert slots[0].numel() == BUDGET
            proxy.close()  # the sidecar is now unreachable
            nxt = _step(tiny, cache, rec, run, slots, torch.tensor(PROMPT[40:44]), nxt)
            run.call(cache, slots, "decode")  # sent; fails on its thread
            before = slots[0].clone()
            nxt = _step(tiny, cache, rec, run, slots, torch.tensor(PROMPT[44:48]), nxt)
            with pytest.raises(Unavailable):
                run.call(cache, slots, "decode")
            assert torch.equal(slots[0], torch.cat([before, torch.arange(44, 48)]))  # nothing applied
            assert cache_lengths(cache)[0] == slots[0].numel()
        backend.shutdown()


def test_drain_refuses_pending_tokens(tiny: Any) -> None:
    from transformers import DynamicCache

    rec = QueryRecorder(len(attention_modules(tiny)))
    cache = DynamicCache(config=tiny.config)
    slots = [torch.empty(0, dtype=torch.int64)]
    with torch.inference_mode(), capture_queries(tiny, rec), PolicyRun(LocalBackend(), _cfg(4), pipeline=True) as run:
        nxt = _step(tiny, cache, rec, run, slots, torch.tensor(PROMPT[:40]), 0)
        assert run.call(cache, slots, "context") == [[]] and run.in_flight
        _step(tiny, cache, rec, run, slots, torch.tensor([5]), nxt)
        with pytest.raises(RuntimeError, match="drain with 1 tokens pending"):
            run.drain(cache, slots)
        run.call(cache, slots, "decode")
        # nothing pending now: drain applies the answer in flight (41 -> 24 + 1 slots, under budget + slack)
        assert run.drain(cache, slots) == [[]]
        assert not run.in_flight and cache_lengths(cache)[0] == slots[0].numel() == BUDGET + 1


@pytest.mark.slow
def test_cli_generate_pipelined_against_a_slow_sidecar(sidecar: SidecarProc, capsys: Any) -> None:
    """`generate --sidecar ... --pipeline` (and --no-pipeline) on SmolLM2 through a proxy holding 50 ms."""
    from nexus_sidecar.cli import main

    from tests.client.conftest import PASSKEY_PROMPT, require_smollm2

    require_smollm2()
    outs = []
    with DelayProxy(sidecar.target, 0.05) as proxy:
        for flag in ("--pipeline", "--no-pipeline"):
            rc = main(["generate", "--model", "smollm2", "--budget", "48", "--slack", "4", "--every", "4",
                       "--chunk-size", "32", "--max-new-tokens", "10", "--prompt", PASSKEY_PROMPT,
                       "--sidecar", proxy.target, flag])  # fmt: skip
            out = capsys.readouterr().out
            assert rc == 0 and "policy calls" in out and "evictions:" in out
            outs.append(out)
    calls = [int(o.split("policy calls ")[1].split()[0]) for o in outs]
    assert calls[0] > 3 and calls[1] >= calls[0]  # blocking also calls early once over budget + slack


class _Priors(LocalBackend):
    """The in-process engine, keeping the priors every call carried."""

    def __init__(self) -> None:
        super().__init__()
        self.priors: list[dict[str, torch.Tensor]] = []

    def step(self, session: Any, tensors: Any) -> Any:
        self.priors.append(tensors.priors)
        return super().step(session, tensors)


@pytest.mark.parametrize("groups", [1, 2], ids=["shared", "per-layer"])
@pytest.mark.parametrize("pipeline", [False, True], ids=["blocking", "pipelined"])
@torch.inference_mode()
def test_kept_slot_norms_give_the_priors_of_a_fresh_computation(tiny: Any, groups: int, pipeline: bool) -> None:
    """PolicyRun keeps |k| and |v| of the slots between calls (computing only new slots'); the
    priors each call sends equal slot_priors over the slots the call covers, computed from scratch."""
    from nexus_client.hf.capture import cache_kv
    from nexus_client.summary import slot_priors
    from transformers import DynamicCache

    rec = QueryRecorder(len(attention_modules(tiny)))
    cache = DynamicCache(config=tiny.config)
    slots = [torch.empty(0, dtype=torch.int64) for _ in range(groups)]
    backend = _Priors()
    expected = []
    ids = torch.tensor(PROMPT)
    with capture_queries(tiny, rec):
        run = PolicyRun(backend, {**_cfg(4, groups), "policy": "keydiff"}, pipeline=pipeline)
        nxt = 0
        for piece in [*ids.split(CHUNK), *torch.arange(3, 15).split(4)]:
            pos = torch.arange(nxt, nxt + piece.numel())
            tiny(input_ids=piece[None], position_ids=pos[None], past_key_values=cache, use_cache=True)
            for g in range(groups):
                slots[g] = torch.cat([slots[g], pos])
            run.add(rec.take(), pos, slots)
            nxt += piece.numel()
            if not pipeline:  # blocking: the call covers the cache as it is now
                expected.append(slot_priors(*cache_kv(cache), groups))
            run.call(cache, slots, "context")
            if pipeline:  # pipelined: the retained slots after the previous answer, then the new ones
                expected.append(slot_priors(*cache_kv(cache), groups))
        run.close()
    assert len(backend.priors) == len(expected) == run.calls and run.evicted > 0
    for got, want in zip(backend.priors, expected, strict=True):
        for name, t in want.items():
            width = got[name].shape[1]
            assert torch.allclose(got[name], t[:, :width].cpu(), atol=1e-5), name


def test_call_many_refuses_runs_it_cannot_send_together() -> None:
    """One backend call carries the runs of call_many: same backend, all blocking or all pipelined
    on one shared pool, one cache, slot list and kind per run."""
    import concurrent.futures

    from nexus_client.hf.policy_run import call_many

    a, b = LocalBackend(), LocalBackend()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    cfg = _cfg(4)
    runs = [PolicyRun(a, cfg), PolicyRun(b, cfg), PolicyRun(a, cfg, pipeline=True),
            PolicyRun(a, cfg, pipeline=True, pool=pool), PolicyRun(a, cfg, pipeline=True, pool=pool)]
    try:
        with pytest.raises(ValueError, match="same backend"):
            call_many(runs[:2], [None, None], [[], []], ["context", "context"])
        with pytest.raises(ValueError, match="all blocking, or all pipelined on one shared pool"):
            call_many([runs[0], runs[3]], [None, None], [[], []], ["context", "context"])
        with pytest.raises(ValueError, match="all blocking, or all pipelined on one shared pool"):
            call_many([runs[2], runs[3]], [None, None], [[], []], ["context", "context"])
        with pytest.raises(ValueError, match="one of each per run"):
            call_many(runs[3:], [None], [[], []], ["context", "context"])
        with pytest.raises(ValueError, match="only a pipelined run"):
            PolicyRun(a, cfg, pool=pool)
    finally:
        for r in runs:
            r.close()
        pool.shutdown()
