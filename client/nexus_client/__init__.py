"""What an inference worker imports to use the eviction sidecar.

``NexusClient`` / ``AsyncNexusClient`` speak to one sidecar; ``SessionConfig`` names a session's
policy knobs; ``WorkerSession``, ``pack_step``, ``unpack_result`` and ``top_edges`` turn the
worker's attention summaries into a step and the answer back into a keep mask; the exceptions map
the wire contract's status codes. ``NexusRouter`` / ``AsyncNexusRouter`` spread sessions over
several replicas (``StaticEndpoints`` or a headless Service's ``DnsEndpoints``). The transformers
integration lives in ``nexus_client.hf`` (imported separately: it needs transformers).
"""

from nexus_client.client import AsyncNexusClient, ClientOptions, NexusClient, config_message
from nexus_client.columnar import BatchAnswer, BatchBuilder, read_answer
from nexus_client.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    SessionNotFound,
    SidecarError,
    Unauthenticated,
    Unavailable,
)
from nexus_client.packing import WorkerSession, checksum_of, pack_step, top_edges, unpack_result
from nexus_client.routing import AsyncNexusRouter, DnsEndpoints, NexusRouter, SessionLost, StaticEndpoints
from nexus_client.session_config import SessionConfig
from nexus_client.wire import WireError, positions_checksum

__all__ = [
    "AlreadyExists",
    "AsyncNexusClient",
    "AsyncNexusRouter",
    "BatchAnswer",
    "BatchBuilder",
    "ClientOptions",
    "DeadlineExceeded",
    "DnsEndpoints",
    "FailedPrecondition",
    "InvalidArgument",
    "NexusClient",
    "NexusRouter",
    "PermissionDenied",
    "ResourceExhausted",
    "SessionConfig",
    "SessionLost",
    "SessionNotFound",
    "SidecarError",
    "StaticEndpoints",
    "Unauthenticated",
    "Unavailable",
    "WireError",
    "WorkerSession",
    "checksum_of",
    "config_message",
    "pack_step",
    "positions_checksum",
    "read_answer",
    "top_edges",
    "unpack_result",
]
