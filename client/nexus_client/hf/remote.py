"""The ``remote`` policy backend: the same decisions as ``LocalBackend``, made by a sidecar."""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from typing import Any

import torch

from nexus_client.client import ClientOptions, NexusClient
from nexus_client.hf.accumulate import StepTensors
from nexus_client.hf.backends import StepDecision
from nexus_client.packing import WorkerSession, pack_step, unpack_result


class RemoteBackend:
    """Runs each sequence's policy session on a sidecar over gRPC (fp32 summaries by default, so
    the decisions equal the in-process engine's bit for bit)."""

    def __init__(self, target: str, *, api_key: str | None = None, float_dtype: torch.dtype = torch.float32,
                 timeout_s: float = 10.0, session_prefix: str | None = None) -> None:
        self.client = NexusClient(ClientOptions(target, api_key=api_key, timeout_s=timeout_s))
        self.float_dtype = float_dtype
        self._prefix = session_prefix or f"w{os.getpid()}"
        self._ids = itertools.count(1)
        self.bytes_sent = 0
        self.calls = 0

    def open(self, config: Mapping[str, Any]) -> WorkerSession:
        """Open a sidecar session with these policy fields."""
        sid = f"{self._prefix}-{next(self._ids)}"
        resp = self.client.open_session(sid, config)
        return WorkerSession(sid, groups=resp.config.groups, step=resp.step)

    def step(self, session: WorkerSession, tensors: StepTensors) -> StepDecision:
        """One call; the worker's retained count/checksum ride along for the mismatch check."""
        msg = pack_step(session, tensors.new_positions, tensors.attn, tensors.last, tensors.edge_pos,
                        tensors.edge_w, float_dtype=self.float_dtype)
        self.bytes_sent += msg.ByteSize()
        self.calls += 1
        (result,) = self.client.step([msg])
        session.apply(result)
        keep, evicted = unpack_result(result)
        return StepDecision(keep=keep, evicted=evicted)

    def close(self, session: WorkerSession) -> None:
        """Close the sidecar session."""
        self.client.close_session(session.session_id)

    def shutdown(self) -> None:
        """Close the channel."""
        self.client.close()
