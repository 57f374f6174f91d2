"""Pipelined policy calls on the llama.cpp worker (``LlamaWorker(pipeline=True)``), on the real
SmolLM2 GGUF: the same pipelining as the transformers path (``PolicyRun``; several sequences share
one call thread and one ``StepBatch`` per call), each answer applied right before the next call.

Every cache size asserted here is read from llama.cpp, and the worker itself fails an applied answer
after which llama.cpp's cells differ from the positions the policy retained.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.client.conftest import BUDGET, CFG, CHUNK, EVERY, SLACK, require_smollm2

require_smollm2()

from nexus_client.hf import LocalBackend  # noqa: E402
from nexus_client.hf.remote import RemoteBackend  # noqa: E402
from nexus_client.llamacpp import LlamaModel, LlamaWorker, context_cells  # noqa: E402
from nexus_sidecar.bench.delay_proxy import DelayProxy  # noqa: E402
from nexus_sidecar.bench.procs import sidecar_process  # noqa: E402

K = max(CHUNK, EVERY)  # the most tokens one sequence adds between two calls


def test_pipelined_batch_bounds_and_one_call_for_all(lm: LlamaModel, prompts: list[list[int]]) -> None:
    worker = LlamaWorker(lm, LocalBackend(), CFG, every_k=EVERY, chunk_size=CHUNK, pipeline=True)
    res = worker.generate(prompts, 10, stop_at_eos=False)
    st = worker.stats
    assert max(st.sequences_per_call) == len(prompts)  # one call carried every sequence
    assert st.policy_calls < sum(r.policy_calls for r in res)
    for r in res:
        assert r.policy_calls > 2 and r.evicted > 0 and len(r.token_ids) == 10
        # Right after each applied answer: budget + slack + the k tokens added since that call was sent.
        assert max(r.engine_cells_after_call) <= BUDGET + SLACK + K
        # Before a call (the peak): the next call's tokens too, the answer not yet applied.
        assert BUDGET + SLACK + K < r.engine_cells_max <= BUDGET + SLACK + 2 * K
    assert context_cells(4, 400, 10, BUDGET, SLACK, CHUNK, EVERY, pipeline=True) >= 4 * (BUDGET + SLACK + 2 * K)


def test_pipelined_answers_lag_the_blocking_ones_by_one_call(lm: LlamaModel, prompts: list[list[int]]) -> None:
    """The first call sees the same tokens in both modes; blocking applies its answer at once,
    pipelined right before the second call (and not one call earlier)."""
    blocking = LlamaWorker(lm, LocalBackend(), CFG, every_k=EVERY, chunk_size=CHUNK).generate(prompts[:2], 4)
    piped = LlamaWorker(lm, LocalBackend(), CFG, every_k=EVERY, chunk_size=CHUNK, pipeline=True).generate(
        prompts[:2], 4)
    for b, p in zip(blocking, piped, strict=True):
        first_b, first_p = b.evictions[0], p.evictions[0]
        assert first_b.positions == first_p.positions
        assert first_p.step == first_b.step + CHUNK  # applied at the next chunk's call


def test_pipelined_through_a_slow_sidecar_decides_like_in_process(lm: LlamaModel, prompts: list[list[int]]) -> None:
    """A loopback proxy holds every StepBatch answer 40 ms: same tokens and evictions as in-process."""
    local = LlamaWorker(lm, LocalBackend(), CFG, every_k=EVERY, chunk_size=CHUNK, pipeline=True).generate(
        prompts, 8, stop_at_eos=False)
    with sidecar_process("--store", "memory", "--device", "cpu", "--max-delay-us", "0") as proc, \
            DelayProxy(proc.target, 0.04) as proxy, RemoteBackend(proxy.target, session_prefix="llamacpp-pipe") as rb:
        worker = LlamaWorker(lm, rb, CFG, every_k=EVERY, chunk_size=CHUNK, pipeline=True)
        res = worker.generate(prompts, 8, stop_at_eos=False)
        assert rb.calls == worker.stats.policy_calls  # one StepBatch RPC per call, all due sequences in it
        assert max(worker.stats.sequences_per_call) == len(prompts)
    for r, loc in zip(res, local, strict=True):
        assert r.token_ids == loc.token_ids
        assert [e.positions for e in r.evictions] == [e.positions for e in loc.evictions]
        assert max(r.engine_cells_after_call) <= BUDGET + SLACK + K


def test_pipelined_prefill_only_applies_its_last_answer(lm: LlamaModel, prompts: list[list[int]]) -> None:
    """``max_new_tokens = 0`` (the evaluation's context): the last chunk's answer is applied before
    the worker returns, so the cache left in llama.cpp is the compressed one."""
    worker = LlamaWorker(lm, LocalBackend(), CFG, chunk_size=CHUNK, pipeline=True)
    res = worker.generate(prompts[:2], 0)
    for seq, r in enumerate(res):
        assert r.policy_calls == -(-len(prompts[seq]) // CHUNK)
        assert lm.cell_count(seq) <= BUDGET + SLACK
        assert r.engine_cells_after_call[-1] == lm.cell_count(seq)
