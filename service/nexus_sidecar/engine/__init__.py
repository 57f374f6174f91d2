"""The policy engine: pure torch, no I/O.

Nexus scoring (a walk over recorded attention edges that surfaces bridge tokens), weighted
reservoir selection, the top-K baselines, batched session state and its byte layout.
See docs/engine-api.md for the contract.
"""

from nexus_sidecar.engine.config import CALL_KINDS, PolicyConfig
from nexus_sidecar.engine.engine import Engine, default_device
from nexus_sidecar.engine.errors import ConfigError, EngineError, InputError, StateError, UnknownPolicyError
from nexus_sidecar.engine.policies import POLICIES, Policy
from nexus_sidecar.engine.state import GroupState, SessionState
from nexus_sidecar.engine.step_io import BatchInput, BatchOutput, StepInput, StepOutput

__all__ = [
    "CALL_KINDS", "POLICIES", "BatchInput", "BatchOutput", "ConfigError", "Engine", "EngineError", "GroupState",
    "InputError", "Policy",
    "PolicyConfig", "SessionState", "StateError", "StepInput", "StepOutput", "UnknownPolicyError",
    "default_device",
]
