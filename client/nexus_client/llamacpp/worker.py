"""The llama.cpp worker: several sequences decoded together in one llama.cpp context, each under
its own eviction-policy session, with one policy call for all of them.

Per step, every live sequence contributes its next prompt chunk or its next generated token to one
``llama_decode`` (sequence ids, explicit positions). The graph capture hands back every layer's
post-RoPE q, k and v of the batch; per sequence, the worker appends the new keys/values to its
:class:`~.mirror.KVMirror` and the new queries to the sequence's
:class:`~nexus_client.hf.policy_run.PolicyRun`, which at each call summarises them against the
mirrored keys with the one summary function every integration uses
(:func:`nexus_client.summary.summarize`). When calls are due (after
every prompt chunk; while writing, every ``every_k`` tokens or as soon as a cache exceeds ``budget +
slack``), the due sequences' summaries go to the backend in **one** call
(``backend.step_many``: one engine step in-process, one ``StepBatch`` RPC for a sidecar, through
:func:`~nexus_client.hf.policy_run.call_many`); each answer is checked and cut out of the mirror,
and out of llama.cpp's KV cache with ``llama_memory_seq_rm`` per run of evicted positions.
Pipelined (``pipeline=True``), the call goes out on a background thread and its answers are applied
right before the sequences' next call: the transformers path's pipelining, the same code.

Groups: llama.cpp's memory API removes a position from every layer of a sequence at once (cell
metadata is shared by all layers), so only one shared eviction group is possible; per-layer groups
are refused.

With ``check_cache`` the worker reads the cells llama.cpp holds for the sequence right before and
after each call (:meth:`~.model.LlamaModel.cells`) and fails if they differ from the positions the
policy retained: the cache sizes it reports come from llama.cpp, not from the worker's bookkeeping.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nexus_client.hf.backends import PolicyBackend
from nexus_client.hf.capture import ForwardQueries
from nexus_client.hf.generate import Eviction
from nexus_client.hf.policy_run import PolicyRun, call_many
from nexus_client.llamacpp.mirror import KVMirror
from nexus_client.llamacpp.model import Decoded, LlamaModel
from nexus_client.summary import HeadReduce


def context_cells(n_seq: int, prompt_tokens: int, max_new_tokens: int, budget: int | None = None, slack: int = 0,
                  chunk_size: int = 256, every_k: int = 1, pipeline: bool = False) -> int:
    """KV cells a context needs for ``n_seq`` sequences: each holds at most ``budget + slack`` after a
    call plus what arrives before the next one (a prompt chunk, or ``every_k`` tokens; pipelined,
    twice that: the next call's tokens arrive before the answer lands); dense (``budget`` None)
    holds the whole prompt and answer."""
    if budget is None:
        per = prompt_tokens + max_new_tokens
    else:
        per = min(budget + slack + (2 if pipeline else 1) * max(chunk_size, every_k) + 1,
                  prompt_tokens + max_new_tokens)
    return n_seq * per


@dataclass
class SequenceResult:
    """What one sequence produced.

    ``engine_cells_max``: the most KV cells llama.cpp held for the sequence, read from llama.cpp
    right before every policy call (after the forward that added the call's tokens: the peak) and
    at the end (0 when ``check_cache`` was off). ``engine_cells_after_call``: llama.cpp's cell count
    right after each call.
    """

    token_ids: list[int]
    text: str
    prompt_tokens: int
    policy_calls: int = 0
    evicted: int = 0
    evictions: list[Eviction] = field(default_factory=list)
    engine_cells_max: int = 0
    engine_cells_after_call: list[int] = field(default_factory=list)
    summaries: list[Any] = field(default_factory=list)  # the StepTensors sent, when ``keep_summaries``


@dataclass
class WorkerStats:
    """Counts and seconds of one :meth:`LlamaWorker.generate`."""

    decodes: int = 0  # llama_decode calls
    tokens: int = 0  # tokens decoded (prompt + generated, all sequences)
    policy_calls: int = 0  # backend calls (each covers every sequence with a call due)
    decode_s: float = 0.0  # in llama_decode (the graph capture's callback and copies included)
    capture_s: float = 0.0  # new keys/values into the mirrors, new queries to the sessions
    summary_s: float = 0.0  # building summaries (pipelined: on the call thread, overlapping decode)
    policy_s: float = 0.0  # in the backend (pipelined: waiting for answers not yet there)
    wait_s: float = 0.0  # pipelined: the decode thread stalled for an answer
    surgery_s: float = 0.0  # cuts of mirrors and llama.cpp's cache (seq_rm), cache checks
    wall_s: float = 0.0
    mirror_bytes_max: int = 0
    sequences_per_call: list[int] = field(default_factory=list)


@dataclass
class _Seq:
    seq: int
    prompt: list[int]
    fed: int = 0  # prompt tokens decoded
    generated: list[int] = field(default_factory=list)
    done: bool = False
    run: PolicyRun | None = None
    mirror: KVMirror | None = None
    slots: list[torch.Tensor] = field(default_factory=lambda: [torch.empty(0, dtype=torch.int64)])
    result: SequenceResult | None = None

    @property
    def next_pos(self) -> int:
        return self.fed + len(self.generated) - (1 if self.generated else 0)


class LlamaWorker:
    """Greedy decoding of up to ``model.n_seq`` sequences together, each under a policy session.

    ``backend``: a :class:`~nexus_client.hf.backends.PolicyBackend` with ``step_many``
    (:class:`~nexus_client.hf.backends.LocalBackend` or :class:`~nexus_client.hf.remote.RemoteBackend`),
    or ``None`` for dense decoding. ``policy_config``: the engine ``PolicyConfig`` fields (``budget``,
    ``slack``, ...; ``groups`` must be 1). ``chunk_size``: prompt tokens per sequence per step;
    ``every_k``: decode steps between calls; ``window``: the observation window of a call's
    attention (``None``: every query since the last call). ``prefill_kind``: what a prompt chunk's
    call tells the policy its queries are ("context", or "question" for a prompt that ends with the
    question); ``policy_on_decode``: keep calling the policy while the answer is written (off: the
    budget holds over the prompt only, as the evaluation's one-shot settings). ``pipeline``: send
    each call on a background thread and keep decoding; its answers are applied right before the
    sequences' next call (:class:`~nexus_client.hf.policy_run.PolicyRun`'s pipelining, the one the
    transformers path uses), so a cache holds at most ``budget + slack + k`` cells right after each
    call and ``budget + slack + 2k`` between calls (k: the tokens between two calls, a chunk or
    ``every_k``). A prefill-only run (``max_new_tokens = 0``) applies its last answer before it
    returns.
    """

    def __init__(self, model: LlamaModel, backend: PolicyBackend | None = None,
                 policy_config: Mapping[str, Any] | None = None, *, every_k: int = 1, chunk_size: int = 256,
                 head_reduce: HeadReduce = "mean", window: int | None = None, check_cache: bool = True,
                 keep_summaries: bool = False, prefill_kind: str = "context",
                 policy_on_decode: bool = True, pipeline: bool = False) -> None:  # fmt: skip
        if (backend is None) != (policy_config is None):
            raise ValueError("give both backend and policy_config (or neither, for dense decoding)")
        if every_k < 1 or chunk_size < 1:
            raise ValueError(f"need every_k >= 1 and chunk_size >= 1, got {every_k}, {chunk_size}")
        cfg = dict(policy_config or {})
        if backend is not None:
            groups = cfg.get("groups", 1)
            if groups != 1:
                raise ValueError(
                    f"policy_config['groups'] = {groups}: llama.cpp evicts with llama_memory_seq_rm, which removes "
                    "a position from every layer of a sequence at once (its KV cells are shared by all layers), "
                    "so only one shared eviction group (groups = 1) can be applied to its cache")
            if int(cfg.get("recent", 16)) < 1:
                raise ValueError("policy_config['recent'] must be >= 1 on llama.cpp: a sequence's next token must "
                                 "continue its largest cached position, so the newest token may never be evicted")
            if backend is not None and not hasattr(backend, "step_many"):
                raise TypeError(f"{type(backend).__name__} has no step_many (one call for all sequences)")
            if model.capture is None:
                raise ValueError("this LlamaModel was loaded with capture=False: a policy needs its q/k/v")
        self.model = model
        self.backend = backend
        self.config = cfg
        self.every_k = every_k
        self.chunk_size = chunk_size
        self.head_reduce: HeadReduce = head_reduce
        self.window = window
        self.check_cache = check_cache
        self.keep_summaries = keep_summaries
        self.prefill_kind = prefill_kind
        self.policy_on_decode = policy_on_decode
        self.pipeline = pipeline and backend is not None
        self._scaling = model.shape.head_dim**-0.5  # Llama's softmax scale (llama.cpp's kq_scale)
        self.stats = WorkerStats()

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, *, stop_at_eos: bool = True,
                 progress: bool = False) -> list[SequenceResult]:  # fmt: skip
        """Decode every prompt (token ids) greedily, all in the same steps; one result per prompt.

        ``max_new_tokens = 0`` only prefills (the sequences' caches stay in the context, compressed,
        for the caller to continue: the evaluation branches its questions off them)."""
        m = self.model
        if not prompts or len(prompts) > m.n_seq:
            raise ValueError(f"prompts: need 1..{m.n_seq} (the context's n_seq), got {len(prompts)}")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("prompts: an empty prompt")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if len(prompts) * min(self.chunk_size, max(len(p) for p in prompts)) > m.n_batch:
            raise ValueError(f"{len(prompts)} sequences x chunk {self.chunk_size} exceed the context's n_batch "
                             f"{m.n_batch}")
        self.stats = st = WorkerStats()
        t_start = time.perf_counter()
        m.clear()
        seqs = [_Seq(seq=i, prompt=list(map(int, p)), result=SequenceResult([], "", len(p)))
                for i, p in enumerate(prompts)]  # fmt: skip
        # Pipelined: one thread sends every call (all sequences' runs share it, so calls go out in order).
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nexus-llamacpp") if self.pipeline else None
        try:
            for s in seqs:
                if self.backend is not None:
                    s.run = PolicyRun(self.backend, self.config, self.window, head_reduce=self.head_reduce,
                                      pipeline=self.pipeline, pool=pool)  # fmt: skip
                    if self.keep_summaries:
                        s.run.summaries = []
                    s.mirror = KVMirror(m.shape.n_layer, m.shape.n_head_kv, m.shape.head_dim, values=True)
            bar = None
            if progress:
                from tqdm import tqdm

                total = sum(len(p) for p in prompts) + len(prompts) * max_new_tokens
                bar = tqdm(total=total, desc="llama.cpp", unit="tok", leave=False)
            while any(not s.done for s in seqs):
                fed = self._step([s for s in seqs if not s.done], max_new_tokens, stop_at_eos)
                if bar is not None:
                    bar.update(fed)
            if bar is not None:
                bar.close()
            self._drain([s for s in seqs if s.run is not None and s.run.in_flight and not s.run.pending])
        finally:
            for s in seqs:
                if s.run is not None:
                    s.run.close()
            if pool is not None:
                pool.shutdown(wait=True)
        for s in seqs:
            if s.run is not None:
                st.summary_s += s.run.summary_seconds
                st.policy_s += s.run.seconds
                st.wait_s += s.run.wait_seconds
        out = []
        for s in seqs:
            r = s.result
            assert r is not None
            r.token_ids = s.generated
            r.text = m.detokenize([t for t in s.generated if not m.is_eog(t)])
            if s.run is not None:
                r.policy_calls, r.evicted = s.run.calls, s.run.evicted
                r.summaries = list(s.run.summaries or [])
            out.append(r)
        st.wall_s = time.perf_counter() - t_start
        return out

    def _step(self, live: list[_Seq], max_new_tokens: int, stop_at_eos: bool) -> int:
        """One llama_decode for every live sequence, then the policy calls that are due."""
        m, st = self.model, self.stats
        tokens: list[int] = []
        positions: list[int] = []
        ids: list[int] = []
        spans: list[tuple[_Seq, int, int, str]] = []  # (seq, first row, rows, phase)
        for s in live:
            start = len(tokens)
            if s.fed < len(s.prompt):
                chunk = s.prompt[s.fed : s.fed + self.chunk_size]
                pos0 = s.fed
                phase = "prefill"
            else:
                chunk = [s.generated[-1]]
                pos0 = s.next_pos
                phase = "decode"
            if start + len(chunk) > m.n_batch:
                break  # the rest wait for the next step
            tokens += chunk
            positions += range(pos0, pos0 + len(chunk))
            ids += [s.seq] * len(chunk)
            spans.append((s, start, len(chunk), phase))
        wants = [start + n - 1 for s, start, n, phase in spans
                 if max_new_tokens > 0 and (phase == "decode" or s.fed + n >= len(s.prompt))]  # fmt: skip
        t0 = time.perf_counter()
        out = m.decode(tokens, positions, ids, wants)
        st.decode_s += time.perf_counter() - t0
        st.decodes += 1
        st.tokens += len(tokens)
        due: list[tuple[_Seq, str]] = []
        for s, start, n, phase in spans:
            pos = torch.arange(positions[start], positions[start] + n, dtype=torch.int64)
            if phase == "prefill":
                s.fed += n
                if s.fed >= len(s.prompt) and max_new_tokens == 0:
                    s.done = True
            if s.run is not None and (phase == "prefill" or self.policy_on_decode):
                t1 = time.perf_counter()
                self._add(s, out, start, n, pos)
                st.capture_s += time.perf_counter() - t1
                cfg = self.config
                # Pipelined, an answer in flight is about to cut the cache: a call only every k tokens.
                over = not self.pipeline and s.slots[0].numel() > int(cfg.get("budget", 256)) + int(cfg.get("slack", 0))
                if phase == "prefill" or s.run.pending >= self.every_k or over:
                    due.append((s, self.prefill_kind if phase == "prefill" else "decode"))
            last = start + n - 1
            if last in out.logits:
                self._next_token(s, out.logits[last], max_new_tokens, stop_at_eos)
        if due:
            self._call(due)
        return len(tokens)

    def _next_token(self, s: _Seq, logits: torch.Tensor, max_new_tokens: int, stop_at_eos: bool) -> None:
        token = int(torch.argmax(logits))
        s.generated.append(token)
        if (stop_at_eos and self.model.is_eog(token)) or len(s.generated) >= max_new_tokens:
            s.done = True  # the last token is never fed: nothing would read its logits

    def _add(self, s: _Seq, out: Decoded, start: int, n: int, pos: torch.Tensor) -> None:
        """Mirror the new keys/values and hand the new queries (``[H, n, D]`` per layer) to the session."""
        assert s.mirror is not None and s.run is not None
        rows = slice(start, start + n)
        s.mirror.append(out.k, out.v, rows)
        s.slots[0] = torch.cat([s.slots[0], pos])
        s.run.add(ForwardQueries([q[rows].transpose(0, 1) for q in out.q], self._scaling), pos, s.slots)
        self.stats.mirror_bytes_max = max(self.stats.mirror_bytes_max, s.mirror.nbytes())

    def _call(self, due: list[tuple[_Seq, str]]) -> None:
        """One backend call for every due sequence (blocking: its answers; pipelined: the answers of
        their calls in flight) applied to the mirrors and to llama.cpp's cache."""
        m, st = self.model, self.stats
        if self.check_cache:
            for s, _ in due:
                assert s.result is not None
                s.result.engine_cells_max = max(s.result.engine_cells_max, m.cell_count(s.seq))
        runs = [s.run for s, _ in due]
        evicted = call_many(runs, [s.mirror for s, _ in due], [s.slots for s, _ in due],  # type: ignore[arg-type]
                            [kind for _, kind in due])  # fmt: skip
        st.policy_calls += 1
        st.sequences_per_call.append(len(due))
        for (s, kind), gone in zip(due, evicted, strict=True):
            self._cut(s, gone, "decode" if kind == "decode" else "prefill")

    def _drain(self, seqs: list[_Seq]) -> None:
        """Pipelined: apply the answers in flight of ``seqs`` now (waiting for them)."""
        for s in seqs:
            assert s.run is not None
            gone = s.run.drain(s.mirror, s.slots)
            self._cut(s, gone, "decode" if s.generated else "prefill")

    def _cut(self, s: _Seq, evicted: list[list[int]], phase: str) -> None:
        """Remove an applied answer's evicted positions from llama.cpp's cache; check the cells."""
        m = self.model
        assert s.result is not None
        t0 = time.perf_counter()
        m.remove(s.seq, evicted[0])
        if evicted[0]:
            step = len(s.generated) if phase == "decode" else s.fed
            s.result.evictions.append(Eviction(step=step, phase=phase, positions=evicted))
        if self.check_cache:
            cells = np.sort(m.cells(s.seq))
            if not np.array_equal(cells, s.slots[0].numpy()):
                raise RuntimeError(f"seq {s.seq}: llama.cpp holds {cells.size} cells, the policy retained "
                                   f"{s.slots[0].numel()} positions; they differ")
            s.result.engine_cells_after_call.append(int(cells.size))
        self.stats.surgery_s += time.perf_counter() - t0
