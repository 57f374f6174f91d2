"""Transformers integration: run a Hugging Face causal LM under a KV-cache eviction policy.

Submodules import transformers lazily where they can, so importing this package is cheap.
"""

from nexus_client.hf.backends import LocalBackend, PolicyBackend, StepDecision
from nexus_client.hf.cache_surgery import apply_keep_mask, cache_lengths
from nexus_client.hf.capture import ATTN_IMPL, ForwardQueries, QueryRecorder, cache_kv, capture_queries
from nexus_client.hf.generate import Eviction, GenerationResult, generate
from nexus_client.hf.models import LoadedModel, ModelResolutionError, load_model
from nexus_client.hf.policy_run import PolicyRun
from nexus_client.packing import top_edges
from nexus_client.summary import StepTensors, summarize

__all__ = [
    "ATTN_IMPL",
    "Eviction",
    "ForwardQueries",
    "GenerationResult",
    "LoadedModel",
    "LocalBackend",
    "ModelResolutionError",
    "PolicyBackend",
    "PolicyRun",
    "QueryRecorder",
    "StepDecision",
    "StepTensors",
    "apply_keep_mask",
    "cache_kv",
    "cache_lengths",
    "capture_queries",
    "generate",
    "load_model",
    "summarize",
    "top_edges",
]
