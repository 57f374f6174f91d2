"""``nexus_client.summary.summarize``: the summary from q/k/v equals the one read off eager attention.

References: (1) an eager computation written out here (full ``softmax(QK^T)`` per head, the causal
mask by slot index, head reduction, layer mean, then window mass / last row / top-F edges), on
random tensors with grouped-query heads, per-layer groups of different lengths, and tiles small
enough to force several query tiles and the two-pass (key-tiled) softmax; (2) transformers' own
eager attention probabilities (``output_attentions=True``) of a tiny random Llama with GQA and of
SmolLM2-135M, against the queries our ``sdpa`` kernel records and the keys of the ``DynamicCache``,
for prefill chunks and decode steps. Tolerance: float32 rounding, ``atol=1e-5`` on attention
values (rows sum to 1); edges compared as sets of positions where weights are not near-tied.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from nexus_client.hf.capture import ForwardQueries, QueryRecorder, attention_modules, cache_kv, capture_queries
from nexus_client.packing import top_edges
from nexus_client.summary import StepTensors, slot_priors, summarize

from tests.client.conftest import require_smollm2, tiny_llama

ATOL = 1e-5


def eager_rows(queries, keys, groups, head_reduce="mean"):
    """Per group ``[q, L]``: head-reduced, layer-averaged attention rows (the eager capture's rows)."""
    n = len(keys)
    members = [list(range(n))] if groups == 1 else [[i] for i in range(n)]
    out = []
    for layers in members:
        acc = None
        for li in layers:
            q, k = queries[li].double(), keys[li].double()
            h, nq, d = q.shape
            rep = h // k.shape[0]
            kk = k.repeat_interleave(rep, dim=0)
            s = q @ kk.transpose(-1, -2) * d**-0.5
            length = k.shape[1]
            qi = torch.arange(nq).unsqueeze(1) + (length - nq)
            s = s.masked_fill(torch.arange(length).unsqueeze(0) > qi, float("-inf"))
            p = torch.softmax(s, -1)
            r = p.mean(0) if head_reduce == "mean" else p.amax(0)
            acc = r if acc is None else acc + r
        out.append((acc / len(layers)).float())
    return out


def expected_step(rows, slots, fanout, window=None):
    g_attn, g_last, g_ep, g_ew = [], [], [], []
    for r, pos in zip(rows, slots, strict=True):
        w = r if window is None else r[-window:]
        g_attn.append(w.sum(0))
        g_last.append(r[-1])
        ep, ew = top_edges(r, pos, fanout)
        g_ep.append(ep)
        g_ew.append(ew)
    width = max(a.numel() for a in g_attn)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.numel()))  # noqa: E731
    return (torch.stack([pad(a) for a in g_attn]), torch.stack([pad(a) for a in g_last]),
            torch.stack(g_ep), torch.stack(g_ew))


def assert_edges_match(got: StepTensors, ew: torch.Tensor, ep: torch.Tensor) -> None:
    assert torch.allclose(got.edge_w, ew, atol=ATOL)
    # Positions may swap only between near-equal weights.
    same = got.edge_pos == ep
    assert bool(same.all()) or _near_ties(ew, same)


def _near_ties(ew: torch.Tensor, same: torch.Tensor) -> bool:
    for idx in (~same).nonzero().tolist():
        *lead, f = idx
        row = ew[tuple(lead)]
        if not any(abs(float(row[f]) - float(row[j])) < 1e-5 for j in range(row.numel()) if j != f):
            return False
    return True


def random_layers(n_layers, h, hkv, d, lengths, q, seed=0):
    gen = torch.Generator().manual_seed(seed)
    queries = [torch.randn(h, q, d, generator=gen) * 2 for _ in range(n_layers)]
    keys = [torch.randn(hkv, lengths[i], d, generator=gen) * 2 for i in range(n_layers)]
    values = [torch.randn(hkv, lengths[i], d, generator=gen) for i in range(n_layers)]
    return queries, keys, values


@pytest.mark.parametrize("head_reduce", ["mean", "max"])
@pytest.mark.parametrize("tile_elems", [1 << 22, 7 * 8 * 5])  # one tile / many query tiles and key tiles
def test_shared_group_equals_eager(head_reduce: str, tile_elems: int) -> None:
    queries, keys, values = random_layers(3, 8, 2, 16, [40, 40, 40], q=12)
    slots = [torch.tensor(sorted(torch.randperm(1000)[:40].tolist()))]
    got = summarize(queries, keys, values, slots, scaling=16**-0.5, groups=1, fanout=5, head_reduce=head_reduce,
                    tile_elems=tile_elems)
    rows = eager_rows(queries, keys, 1, head_reduce)
    attn, last, ep, ew = expected_step(rows, slots, 5)
    assert got.new_positions.tolist() == slots[0][-12:].tolist()
    assert torch.allclose(got.attn, attn, atol=ATOL) and torch.allclose(got.last, last, atol=ATOL)
    assert_edges_match(got, ew, ep)
    assert got.priors == {}


@pytest.mark.parametrize("tile_elems", [1 << 22, 50])
def test_per_layer_groups_of_different_lengths_window_and_priors(tile_elems: int) -> None:
    lengths = [30, 22, 27]
    queries, keys, values = random_layers(3, 4, 2, 8, lengths, q=5, seed=1)
    new = torch.arange(100, 105)
    slots = [torch.cat([torch.arange(n - 5) * 2, new]) for n in lengths]
    got = summarize(queries, keys, values, slots, scaling=8**-0.5, groups=3, fanout=4, window=3, priors=True,
                    tile_elems=tile_elems)
    rows = eager_rows(queries, keys, 3)
    attn, last, ep, ew = expected_step(rows, slots, 4, window=3)
    assert got.attn.shape == (3, 30) and torch.allclose(got.attn, attn, atol=ATOL)
    assert torch.allclose(got.last, last, atol=ATOL)
    assert (got.attn[1, 22:] == 0).all()  # right padding of the shorter layer
    assert_edges_match(got, ew, ep)
    want = slot_priors(keys, values, 3)
    assert set(got.priors) == {"key_diversity", "key_norm", "value_norm"}
    for name, t in want.items():
        assert torch.allclose(got.priors[name], t, atol=1e-6)


def test_retain_cuts_evicted_slots_without_renormalising() -> None:
    queries, keys, values = random_layers(2, 4, 4, 8, [20, 20], q=4, seed=2)
    slots = [torch.arange(20)]
    retain = torch.ones(16, dtype=torch.bool)
    retain[[2, 5, 11]] = False
    got = summarize(queries, keys, values, slots, scaling=8**-0.5, fanout=3, retain=[retain], priors=True)
    full = eager_rows(queries, keys, 1)[0]
    keep = torch.cat([retain, torch.ones(4, dtype=torch.bool)])
    kept_rows = full[:, keep]
    attn, last, ep, ew = expected_step([kept_rows], [slots[0][keep]], 3)
    assert got.attn.shape == (1, 17)
    assert torch.allclose(got.attn, attn, atol=ATOL) and torch.allclose(got.last, last, atol=ATOL)
    assert float(got.attn.sum()) < 4.0 - 1e-3  # the mass paid to the cut slots is gone, not spread
    assert_edges_match(got, ew, ep)
    assert not set(got.edge_pos.flatten().tolist()) & {2, 5, 11}
    want = slot_priors([k[:, keep] for k in keys], [v[:, keep] for v in values], 1)
    assert torch.allclose(got.priors["key_norm"], want["key_norm"], atol=1e-6)


def test_bad_inputs_name_the_field() -> None:
    queries, keys, values = random_layers(2, 4, 2, 8, [10, 10], q=3)
    slots = [torch.arange(10)]
    with pytest.raises(ValueError, match="groups"):
        summarize(queries, keys, values, slots, scaling=0.3, groups=5)
    with pytest.raises(ValueError, match="layer 1: queries"):
        summarize([queries[0], queries[1][:, :, :4]], keys, values, slots, scaling=0.3)
    with pytest.raises(ValueError, match="slot_positions\\[0\\]"):
        summarize(queries, keys, values, [torch.arange(9)], scaling=0.3)
    with pytest.raises(ValueError, match="retain\\[0\\]"):
        summarize(queries, keys, values, slots, scaling=0.3, retain=[torch.ones(10, dtype=torch.bool)])
    with pytest.raises(ValueError, match="keys must include"):
        summarize(queries, [k[:, :2] for k in keys], values, [torch.arange(2)], scaling=0.3)
    with pytest.raises(ValueError, match="values"):
        summarize(queries, keys, None, slots, scaling=0.3, priors=True)
    with pytest.raises(ValueError, match="head_reduce"):
        summarize(queries, keys, values, slots, scaling=0.3, head_reduce="sum")


def _model_check(model, chunks, groups, head_reduce="mean"):
    """Prefill ``chunks`` then decode: after every forward, the q/k/v summary of that pass equals one
    read off transformers' eager attention probabilities of the same pass."""
    from transformers import DynamicCache

    mods = attention_modules(model)
    cache_ours, cache_ref = DynamicCache(config=model.config), DynamicCache(config=model.config)
    recorder = QueryRecorder(len(mods))
    start = 0
    for tokens in chunks:
        pos = torch.arange(start, start + tokens.numel())
        with capture_queries(model, recorder):
            model(input_ids=tokens[None], position_ids=pos[None], past_key_values=cache_ours, use_cache=True)
        fq: ForwardQueries = recorder.take()
        model.set_attn_implementation("eager")
        out = model(input_ids=tokens[None], position_ids=pos[None], past_key_values=cache_ref, use_cache=True,
                    output_attentions=True)
        model.set_attn_implementation("sdpa")
        start += tokens.numel()
        keys, values = cache_kv(cache_ours)
        slots = [torch.arange(start)] * groups
        got = summarize(fq.queries, keys, values, slots, scaling=fq.scaling, groups=groups, fanout=4,
                        head_reduce=head_reduce)
        probs = [a[0].float() for a in out.attentions]  # [H, q, L] per layer
        red = [p.mean(0) if head_reduce == "mean" else p.amax(0) for p in probs]
        rows = [torch.stack(red).mean(0)] if groups == 1 else red
        attn, last, ep, ew = expected_step(rows, slots, 4)
        assert torch.allclose(got.attn, attn, atol=1e-4 * tokens.numel()), (got.attn - attn).abs().max()
        assert torch.allclose(got.last, last, atol=ATOL)
        assert_edges_match(got, ew, ep)
        kref = torch.stack([layer.keys for layer in cache_ref.layers])
        kours = torch.stack([layer.keys for layer in cache_ours.layers])
        # The sdpa forward kept the same cache, up to the rounding of a different kernel (30 layers deep).
        assert torch.allclose(kref, kours, atol=1e-3, rtol=1e-4), (kref - kours).abs().max()


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("head_reduce", ["mean", "max"])
@torch.inference_mode()
def test_tiny_llama_gqa_prefill_chunks_and_decode_equal_eager_attention(groups: int, head_reduce: str) -> None:
    model = tiny_llama()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(0))
    chunks = [ids[:16], ids[16:30], ids[30:31], ids[31:32], ids[32:33]]
    _model_check(model, chunks, groups, head_reduce)


@pytest.mark.slow
@torch.inference_mode()
def test_smollm2_prefill_chunk_and_decode_equal_eager_attention() -> None:
    require_smollm2()
    from nexus_client.hf import load_model

    loaded = load_model("smollm2")
    model, tok = loaded.model, loaded.tokenizer
    ids = tok("The secret pass key is 8411. Remember it. The grass is green. " * 6, return_tensors="pt").input_ids[0]
    chunks = [ids[:48], ids[48:64], ids[64:65], ids[65:66]]
    _model_check(model, chunks, 1)
    _model_check(model, chunks[:2], model.config.num_hidden_layers)
