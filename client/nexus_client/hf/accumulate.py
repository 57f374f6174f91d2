"""Kept for imports: the call summary lives in :mod:`nexus_client.summary` (``StepTensors``) and is
built from queries and keys by :func:`nexus_client.summary.summarize`; between calls a worker keeps
the pending queries (:meth:`nexus_client.hf.policy_run.PolicyRun.add`)."""

from nexus_client.packing import top_edges
from nexus_client.summary import StepTensors

__all__ = ["StepTensors", "top_edges"]
