"""Server configuration: flags > environment (``NEXUS_*``) > an optional TOML/JSON file > defaults.

Validated once at the edge (pydantic); printed at start-up with secrets redacted.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_LIMITS = "tenancy and limits"


class ServerSettings(BaseSettings):
    """Every knob of ``nexus-sidecar serve``."""

    model_config = SettingsConfigDict(env_prefix="NEXUS_", extra="forbid")

    grpc_host: str = "0.0.0.0"
    grpc_port: int = Field(50051, ge=0, le=65535)
    uds: str | None = None  # also listen on a unix socket (same-pod workers)
    http_host: str = "0.0.0.0"
    http_port: int = Field(8080, ge=0, le=65535)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    torch_threads: int = Field(0, ge=0, le=256)  # intra-op threads of the engine (0 = torch default)
    store: str = "memory"  # memory | redis://... | rediss://... | redis+cluster://...
    store_ttl_s: float = Field(3600.0, gt=0)
    store_timeout_s: float = Field(2.0, gt=0)
    # Steps between checkpoints (0 = on close/idle/shutdown only). Unset: 16 with a Redis store,
    # 0 with the memory store (its checkpoints die with the process anyway).
    checkpoint_every: int | None = Field(None, ge=0)
    # 16: measured at B = 64 x 4096 (bench checkpoint): 8 -> 4.9 KB, 16 -> 3.6 KB, 32 -> 3.7 KB per
    # session-step (deltas are cumulative, so they grow with the slots appended since the full one).
    checkpoint_full_every: int = Field(
        16, ge=1, le=1_000_000, description="every Nth checkpoint of a session is a full one, the others are deltas "
                                           "against it (appended and evicted slots, changed memory; 1 = every "
                                           "checkpoint full); a delta over half the full one's size starts a new full")
    idle_session_s: float = Field(900.0, gt=0)  # hot sessions idle this long are checkpointed and unloaded
    maintenance_period_s: float = Field(
        30.0, gt=0, description="how often idle sessions are unloaded and the pool is trimmed (freed rows and "
                                "empty width classes given back); at most idle_session_s / 2")
    max_batch: int = Field(64, ge=1, le=4096)
    max_delay_us: int = Field(500, ge=0, le=1_000_000)
    queue_size: int = Field(4096, ge=1)
    keys_file: Path | None = None
    max_message_mb: int = Field(64, ge=1, le=2047)
    keepalive_s: float = Field(30.0, gt=0)
    max_connection_age_s: float = Field(600.0, gt=0)
    shutdown_grace_s: float = Field(10.0, ge=0)
    default_policy: str = "nexus"
    # Admission limits (server/admission.py): every resource a client can make the server allocate
    # has one, with a safe non-zero default; a request over a limit is refused before allocation.
    max_sessions_per_tenant: int = Field(10_000, ge=0)  # hot sessions per tenant (0 = unlimited)
    max_budget: int = Field(0, ge=0)
    max_session_slots: int = Field(
        262_144, ge=1, description="retained slots one session may hold: groups x (budget + slack)",
        json_schema_extra={"group": _LIMITS})
    max_new_tokens_per_step: int = Field(
        8192, ge=1, description="new tokens (k) one step of one session may carry",
        json_schema_extra={"group": _LIMITS})
    max_groups: int = Field(128, ge=1, le=1024, description="layer groups per session",
                            json_schema_extra={"group": _LIMITS})
    max_fanout: int = Field(64, ge=1, le=64, description="edges kept per token (fanout)",
                            json_schema_extra={"group": _LIMITS})
    max_sessions_per_rpc: int = Field(512, ge=1, description="session steps one Step RPC may carry",
                                      json_schema_extra={"group": _LIMITS})
    max_concurrent_rpcs: int = Field(
        1024, ge=1, description="RPCs the server handles at once; beyond, gRPC answers RESOURCE_EXHAUSTED at once "
                                "(bounds the request bytes held in flight to about this x max_message_mb)",
        json_schema_extra={"group": _LIMITS})
    malloc_mmap_threshold_kb: int = Field(
        32768, ge=0, description="glibc: allocations of at least this many KiB are mmapped and returned to the OS "
                                 "when freed, keeping RSS flat under bursts of large requests (0 = glibc default; "
                                 "at most 32768)",
        json_schema_extra={"group": _LIMITS})
    metrics_require_key: bool = Field(
        False, description="/metrics answers only with a valid API key (Authorization: Bearer; Prometheus: "
                           "authorization.credentials): tenant names are visible there")
    fence_timeout_s: float = Field(
        0.2, gt=0, le=10, description="longest wait for the owner-epoch read of a Step (shared store); on a "
                                      "timeout or error the check is skipped for 1 s and steps are served from hot "
                                      "state (writes stay fenced)")
    readiness_timeout_s: float = Field(
        0.5, gt=0, le=10, description="longest wait for the store ping and the device op of one readiness check "
                                      "(/readyz and gRPC health answer within about twice this)")
    pool_budget_mb: int = Field(
        2048, ge=1, description="bytes the hot session pool may occupy on the device, MiB; idle sessions are "
                                "checkpointed and unloaded (LRU) before anything is refused",
        json_schema_extra={"group": _LIMITS})
    # Retention page (/ui/sessions/{id}): the last N calls of the M most recently started sessions.
    ui_history_sessions: int = Field(16, ge=0, le=4096)
    ui_history_calls: int = Field(64, ge=0, le=1024)

    @field_validator("store")
    @classmethod
    def _check_store(cls, v: str) -> str:
        if v == "memory" or v.split("://", 1)[0] in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
            return v
        raise ValueError("must be 'memory' or a redis://, rediss:// or redis+cluster:// URL")

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if v in ("auto", "cpu") or v == "cuda" or v.startswith("cuda:"):
            return v
        raise ValueError("must be auto, cpu, cuda or cuda:N")

    @property
    def checkpoint_cadence(self) -> int:
        """Effective steps between checkpoints."""
        if self.checkpoint_every is not None:
            return self.checkpoint_every
        return 0 if self.store == "memory" else 16

    def grpc_options(self) -> list[tuple[str, Any]]:
        """The gRPC server's channel options: message sizes, keepalive, connection age. (A fixed HTTP/2
        stream window instead of gRPC's adaptive one saved no server CPU: benchmarks/grpc_window.py.)"""
        size = self.max_message_mb * 1024 * 1024
        return [
            ("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size),
            ("grpc.keepalive_time_ms", int(self.keepalive_s * 1000)), ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.max_connection_age_ms", int(self.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(max(self.shutdown_grace_s, 1) * 1000)),
        ]

    def redacted(self) -> dict[str, Any]:
        """Settings as a dict with passwords in URLs hidden (for the start-up log)."""
        data = self.model_dump(mode="json")
        parts = urlsplit(self.store)
        if parts.password:
            netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
            data["store"] = urlunsplit(parts._replace(netloc=netloc))
        return data


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> ServerSettings:
    """Build settings from an optional TOML/JSON file, the environment, and explicit overrides.

    Overrides (from flags) win over the environment, which wins over the file.
    """
    file_values: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        text = path.read_text()
        file_values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    env_only = ServerSettings()  # reads NEXUS_* variables
    env_set = {k: getattr(env_only, k) for k in env_only.model_fields_set}
    merged = {**file_values, **env_set, **{k: v for k, v in overrides.items() if v is not None}}
    return ServerSettings(**merged)
