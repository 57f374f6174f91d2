"""Transformers integration: run a Hugging Face causal LM under a KV-cache eviction policy.

Submodules import transformers lazily where they can, so importing this package is cheap.
"""

from nexus_client.hf.accumulate import AttentionAccumulator, StepTensors, top_edges
from nexus_client.hf.backends import LocalBackend, PolicyBackend, StepDecision
from nexus_client.hf.cache_surgery import apply_keep_mask, cache_lengths
from nexus_client.hf.capture import ATTN_IMPL, AttentionRecorder, ForwardCapture, capture_attention
from nexus_client.hf.generate import Eviction, GenerationResult, generate
from nexus_client.hf.models import LoadedModel, ModelResolutionError, load_model
from nexus_client.hf.policy_run import PolicyRun

__all__ = [
    "ATTN_IMPL",
    "AttentionAccumulator",
    "AttentionRecorder",
    "Eviction",
    "ForwardCapture",
    "GenerationResult",
    "LoadedModel",
    "LocalBackend",
    "ModelResolutionError",
    "PolicyBackend",
    "PolicyRun",
    "StepDecision",
    "StepTensors",
    "apply_keep_mask",
    "cache_lengths",
    "capture_attention",
    "generate",
    "load_model",
    "top_edges",
]
