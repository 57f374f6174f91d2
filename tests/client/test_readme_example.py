"""The README's "Use it from your own worker" example, executed as written against a real sidecar."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from nexus_client import checksum_of
from nexus_sidecar.server.app import Sidecar
from nexus_sidecar.server.settings import ServerSettings

README = Path(__file__).resolve().parents[2] / "README.md"
HEADING = "## Use it from your own worker"


def readme_example() -> str:
    """The first ```python block after the section heading."""
    text = README.read_text()
    assert HEADING in text, f"README lost its {HEADING!r} section"
    block = re.search(r"```python\n(.*?)```", text[text.index(HEADING):], re.S)
    assert block is not None, "no python block in the section"
    return block.group(1)


@pytest.fixture
def sidecar_target() -> Iterator[str]:
    """A real sidecar (memory store) on a loopback port, in a background event loop."""
    loop = asyncio.new_event_loop()
    settings = ServerSettings(grpc_host="127.0.0.1", grpc_port=0, http_host="127.0.0.1", http_port=0, device="cpu")
    sc = Sidecar(settings)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(sc.start(), loop).result(60)
    try:
        yield f"127.0.0.1:{sc.grpc_port}"
    finally:
        asyncio.run_coroutine_threadsafe(sc.stop(grace=0.5), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_readme_worker_example_runs_and_applies_evictions(sidecar_target: str) -> None:
    code = readme_example()
    assert code.count("\n") <= 30, "the example should stay short"
    assert '"127.0.0.1:50051"' in code
    scope: dict[str, object] = {}
    exec(compile(code.replace('"127.0.0.1:50051"', repr(sidecar_target)), "README example", "exec"), scope)
    cache, ws = scope["cache"], scope["ws"]
    assert isinstance(cache, torch.Tensor)
    # 160 tokens through a budget of 64: the worker holds exactly the budget, the rest was evicted,
    # and what it holds is what the sidecar holds (its checksum of the worker's positions matches).
    assert cache.numel() == 64 and scope["evicted_total"] == 160 - 64
    assert ws.step == 40 and ws.retained_count == 64  # type: ignore[attr-defined]
    assert checksum_of([cache]) == ws.retained_checksum  # type: ignore[attr-defined]
    assert torch.equal(cache, cache.sort().values) and cache[:4].tolist() == [0, 1, 2, 3]  # sinks kept


def test_public_names_are_exported() -> None:
    import nexus_client

    for name in ("NexusClient", "AsyncNexusClient", "ClientOptions", "SessionConfig", "SidecarError",
                 "SessionNotFound", "FailedPrecondition", "Unavailable", "WorkerSession", "pack_step",
                 "unpack_result", "top_edges", "NexusRouter", "AsyncNexusRouter", "DnsEndpoints", "SessionLost"):
        assert name in nexus_client.__all__ and hasattr(nexus_client, name), name
    assert sorted(nexus_client.__all__) == nexus_client.__all__


def test_session_config_mirrors_the_wire_policy_config() -> None:
    from nexus_client import SessionConfig, config_message
    from nexus_client.v1 import sidecar_pb2 as pb

    wire = [f.name for f in pb.PolicyConfig.DESCRIPTOR.fields]
    assert sorted(SessionConfig.__dataclass_fields__) == sorted(wire)
    cfg = SessionConfig(policy="tova", budget=32, randomness="fixed", tau=float("inf"))
    assert dict(cfg) == {"policy": "tova", "budget": 32, "tau": float("inf"), "randomness": "fixed"}
    msg = config_message(cfg)
    assert msg.budget == 32 and msg.randomness == pb.RANDOMNESS_FIXED and not msg.HasField("slack")
