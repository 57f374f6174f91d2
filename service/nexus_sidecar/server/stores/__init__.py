"""Durable session-state stores: in-process memory (default) and Redis (standalone/Cluster)."""

from nexus_sidecar.server.stores.base import (
    ANSWERED,
    OUTCOMES,
    Fenced,
    InvalidId,
    OnOp,
    StateStore,
    StoredState,
    StoreError,
    StoreUnavailable,
    bounded,
    validate_id,
    validate_ids,
)
from nexus_sidecar.server.stores.memory import MemoryStore
from nexus_sidecar.server.stores.redis_store import RedisStore

__all__ = [
    "ANSWERED",
    "OUTCOMES",
    "Fenced",
    "InvalidId",
    "MemoryStore",
    "OnOp",
    "RedisStore",
    "StateStore",
    "StoreError",
    "StoreUnavailable",
    "StoredState",
    "bounded",
    "validate_id",
    "validate_ids",
]
