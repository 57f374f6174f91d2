"""PolicyConfig validation: every field's range, with the field named in the error."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nexus_sidecar.engine import POLICIES, ConfigError, Engine, PolicyConfig, UnknownPolicyError

BAD: list[tuple[str, object]] = [
    ("policy", "lru"), ("policy", ""), ("policy", "NEXUS"),
    ("budget", 0), ("budget", -3), ("budget", 2.5), ("budget", True), ("budget", "256"),
    ("slack", -1), ("slack", 1.0),
    ("sinks", -1), ("recent", -2), ("recent", None),
    ("groups", 0), ("groups", 1025),
    ("iterations", -1), ("iterations", 17),
    ("fanout", 0), ("fanout", 65),
    ("seed", 2**63), ("seed", -(2**63) - 1), ("seed", 1.5),
    ("pool", 2), ("pool", 4), ("pool", 0), ("pool", 65),
    ("block_size", 0), ("block_size", 4097),
    ("beta", 1.0), ("beta", -0.1), ("beta", math.nan), ("beta", math.inf), ("beta", "0.5"),
    ("gamma", 1.0), ("gamma", -1e-9), ("gamma", math.nan),
    ("tau", -1.0), ("tau", math.nan), ("tau", -math.inf), ("tau", "4"),
    ("randomness", "sometimes"), ("granularity", "page"), ("attn_reduce", "avg"), ("attn_reduce", None),
    ("pool_reduce", "sum"),
    ("prior", "attention"), ("prior", None), ("prior", "KEY_NORM"),
    ("prior_mix", -0.1), ("prior_mix", 1.5), ("prior_mix", math.nan), ("prior_mix", "0.5"), ("prior_mix", True),
    ("prior_sharpness", -1.0), ("prior_sharpness", 17.0), ("prior_sharpness", math.inf), ("prior_sharpness", None),
    ("react_calls", "context"), ("react_calls", None), ("react_calls", "ALL"),
    ("question_prior_mix", -0.5), ("question_prior_mix", 1.01), ("question_prior_mix", math.nan),
    ("question_prior_mix", "0.2"),
]


@pytest.mark.parametrize(("field", "value"), BAD)
def test_bad_value_names_its_field(field: str, value: object) -> None:
    base = PolicyConfig(budget=256, sinks=0, recent=0)
    with pytest.raises(ConfigError) as err:
        PolicyConfig(**{**base.to_dict(), field: value}).validate()
    assert err.value.field == field, str(err.value)
    assert err.value.reason and str(err.value).startswith(f"{field}: ")


def test_unknown_policy_is_its_own_class_and_lists_the_known() -> None:
    with pytest.raises(UnknownPolicyError) as err:
        PolicyConfig(policy="lfu").validate()
    assert isinstance(err.value, ConfigError) and err.value.field == "policy"
    for name in POLICIES:
        assert name in err.value.reason


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_defaults_and_edges_are_valid(policy: str) -> None:
    PolicyConfig(policy=policy).validate()
    for tau in (0.0, 1e-9, 1e6, math.inf):
        PolicyConfig(policy=policy, tau=tau).validate()
    PolicyConfig(policy=policy, beta=0.0, gamma=0.0, iterations=0, pool=63, fanout=64, seed=-(2**63)).validate()
    PolicyConfig(policy=policy, budget=1, sinks=0, recent=0).validate()
    for prior in ("key_diversity", "key_norm", "value_norm"):
        for mix in (0.0, 1.0, 0, 1):
            PolicyConfig(policy=policy, prior=prior, prior_mix=mix).validate()


def test_budget_below_protected_size_token_mode() -> None:
    PolicyConfig(budget=20, sinks=4, recent=16).validate()
    with pytest.raises(ConfigError) as err:
        PolicyConfig(budget=19, sinks=4, recent=16).validate()
    assert err.value.field == "budget" and "20" in err.value.reason


@settings(max_examples=60, deadline=None)
@given(sinks=st.integers(0, 40), recent=st.integers(0, 40), bs=st.integers(1, 16))
def test_budget_below_protected_size_block_mode(sinks: int, recent: int, bs: int) -> None:
    cfg = PolicyConfig(budget=1, sinks=sinks, recent=recent, granularity="block", block_size=bs)
    need = cfg.protected_capacity()
    # Whole blocks: at least the sink blocks and the recent blocks (which may straddle one more).
    assert need >= sinks + recent and need % bs == 0
    assert need >= -(-sinks // bs) * bs
    if max(need, 1) > 1:
        with pytest.raises(ConfigError) as err:
            cfg.with_(budget=max(need, 1) - 1)
        assert err.value.field == "budget"
    cfg.with_(budget=max(need, 1))


def test_with_validates() -> None:
    cfg = PolicyConfig()
    assert cfg.with_(budget=512).budget == 512
    with pytest.raises(ConfigError) as err:
        cfg.with_(pool=2)
    assert err.value.field == "pool"


def test_dict_and_json_round_trip() -> None:
    cfg = PolicyConfig(policy="h2o", budget=100, tau=math.inf, seed=-5, granularity="block", block_size=8)
    assert PolicyConfig.from_dict(cfg.to_dict()) == cfg
    assert PolicyConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert cfg.to_json() == PolicyConfig.from_dict(cfg.to_dict()).to_json()
    assert list(json.loads(cfg.to_json())) == sorted(json.loads(cfg.to_json()))


def test_from_dict_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ConfigError) as err:
        PolicyConfig.from_dict({"budget": 10, "bugdet": 5})
    assert err.value.field == "bugdet"
    with pytest.raises(ConfigError) as err:
        PolicyConfig.from_dict({"budget": 10, "sinks": 0, "recent": 0, "gamma": 2.0})
    assert err.value.field == "gamma"


def test_batch_key_separates_structural_fields_only() -> None:
    cfg = PolicyConfig()
    for per_session in ({"budget": 999}, {"slack": 3}, {"sinks": 1}, {"recent": 2}, {"seed": 9}, {"groups": 4}):
        assert cfg.with_(**per_session).batch_key() == cfg.batch_key(), per_session
    other_randomness = "fixed" if cfg.randomness == "per_call" else "per_call"
    for structural in ({"policy": "h2o"}, {"beta": 0.1}, {"iterations": 3}, {"gamma": 0.9}, {"tau": 1.0},
                       {"randomness": other_randomness}, {"pool": 3}, {"granularity": "block"}, {"block_size": 32},
                       {"attn_reduce": "mean"}, {"pool_reduce": "mean"}, {"prior": "value_norm"},
                       {"prior_mix": 0.25}, {"prior_sharpness": 3.0}):
        assert cfg.with_(**structural).batch_key() != cfg.batch_key(), structural


def test_engine_open_validates() -> None:
    with pytest.raises(ConfigError) as err:
        Engine("cpu").open(PolicyConfig(budget=3, sinks=2, recent=2))
    assert err.value.field == "budget"


def test_a_checkpointed_session_keeps_the_memory_it_was_written_with() -> None:
    """Defaults move (gamma 0.95 -> 0.5 on 2026-12-06); a state blob's config spells every field,
    so a session restored from it keeps its own value instead of today's default."""
    written = PolicyConfig(budget=64, gamma=0.95)
    assert PolicyConfig(budget=64).gamma != 0.95
    restored = PolicyConfig.from_stored(json.loads(written.to_json()))
    assert restored == written and restored.gamma == 0.95
