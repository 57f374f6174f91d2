"""Policy registry: importing this package registers every policy."""

from nexus_sidecar.engine.config import PolicyConfig
from nexus_sidecar.engine.policies import baselines, nexus  # noqa: F401  (registration)
from nexus_sidecar.engine.policies.base import POLICIES, Policy, ScoreContext, Scores, SlotOrder, normalize, register

__all__ = ["POLICIES", "Policy", "ScoreContext", "Scores", "SlotOrder", "make_policy", "normalize", "register"]


def make_policy(cfg: PolicyConfig) -> Policy:
    """Instantiate the policy a validated config names."""
    return POLICIES[cfg.policy](cfg)
