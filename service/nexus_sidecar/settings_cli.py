"""``ServerSettings`` on the command line: flags and grouped help generated from the model, settings
errors traced to where the bad value came from, and the effective values printed at start-up.

Everything is derived from ``ServerSettings.model_fields``, so a field added to the settings model
gets a flag, a help line with its default and env name, and source-aware errors without touching
this file. A field may carry its own ``description`` and a ``json_schema_extra={"group": ...}``;
otherwise the tables below describe it, and an unknown field lands in "more settings".
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from nexus_sidecar.server.settings import ServerSettings, load_settings
from nexus_sidecar.usage import UsageError

ENV_PREFIX = "NEXUS_"

# Help group of each field (help order follows this table, then the model's order).
GROUPS: dict[str, tuple[str, ...]] = {
    "network": ("grpc_host", "grpc_port", "uds", "http_host", "http_port", "max_message_mb", "keepalive_s",
                "max_connection_age_s", "shutdown_grace_s"),
    "engine": ("device", "torch_threads", "default_policy"),
    "state store": ("store", "store_ttl_s", "store_timeout_s", "checkpoint_every", "checkpoint_full_every",
                    "idle_session_s"),
    "micro-batcher": ("max_batch", "max_delay_us", "queue_size"),
    "tenancy and limits": ("keys_file", "max_sessions_per_tenant", "max_budget"),
    "retention page": ("ui_history_sessions", "ui_history_calls"),
}
OTHER_GROUP = "more settings"

DESCRIPTIONS: dict[str, str] = {
    "grpc_host": "address the gRPC server binds (0.0.0.0 = every interface)",
    "grpc_port": "gRPC port (0 = any free port)",
    "uds": "also listen on this unix socket path (a worker in the same pod)",
    "http_host": "address of the HTTP side port (/healthz, /readyz, /metrics, /v1/sessions, /ui/sessions)",
    "http_port": "HTTP side port (0 = any free port)",
    "max_message_mb": "largest gRPC message, MiB, both directions",
    "keepalive_s": "gRPC keepalive ping interval",
    "max_connection_age_s": "connections are recycled after this long (spreads clients over replicas)",
    "shutdown_grace_s": "on SIGTERM, how long in-flight RPCs may finish",
    "device": "auto | cpu | cuda | cuda:N",
    "torch_threads": "engine intra-op threads (0 = torch's default; 1 on a busy shared CPU)",
    "default_policy": "policy of an OpenSession that names none",
    "store": "memory | redis://host:port/db | rediss://... | redis+cluster://host:port",
    "store_ttl_s": "sliding TTL of stored sessions, seconds",
    "store_timeout_s": "timeout of one store operation, seconds",
    "checkpoint_every": "steps between checkpoints (0 = only on close, idle unload and shutdown)",
    "idle_session_s": "hot sessions idle this long are checkpointed and unloaded",
    "max_batch": "sessions per engine call",
    "max_delay_us": "longest wait for a batch to fill, microseconds",
    "queue_size": "bounded step queue (RESOURCE_EXHAUSTED beyond)",
    "keys_file": "API keys file, one 'tenant key [rw|ro]' per line, keys of at least 16 characters "
                 "(`nexus-sidecar keys new TENANT` writes one); without it: single tenant 'default', "
                 "no authentication, any 'authorization' header is accepted unchecked",
    "max_sessions_per_tenant": "open sessions per tenant (0 = unlimited)",
    "max_budget": "largest session budget a client may ask for (0 = unlimited)",
    "ui_history_sessions": "sessions whose calls /ui/sessions/ID can draw: the most recently started ones "
                           "(0 = off; each costs ~65 us of engine time per call at 4096 slots)",
    "ui_history_calls": "calls kept per recorded session for /ui/sessions/ID",
}
# How an unset default reads in --help when None means "decided at start-up".
DEFAULT_SHOWN: dict[str, str] = {"checkpoint_every": "16 with a Redis store, 0 with memory"}


def flag_of(name: str) -> str:
    """``grpc_port`` -> ``--grpc-port``."""
    return "--" + name.replace("_", "-")


def env_of(name: str) -> str:
    """``grpc_port`` -> ``NEXUS_GRPC_PORT``."""
    return ENV_PREFIX + name.upper()


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> ``int`` (the type a flag's value is parsed as)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def _metavar(name: str, annotation: Any) -> str:
    base = _base_type(annotation)
    if base is float:
        return "SECONDS" if name.endswith("_s") else "NUMBER"
    return {int: "INT", Path: "PATH"}.get(base, "TEXT")


def grouped_fields() -> list[tuple[str, list[str]]]:
    """(group title, field names) in help order; every model field appears exactly once."""
    fields = ServerSettings.model_fields
    placed: dict[str, list[str]] = {title: [] for title in GROUPS}
    placed[OTHER_GROUP] = []
    for name, info in fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        group = extra.get("group") or next((t for t, names in GROUPS.items() if name in names), OTHER_GROUP)
        placed.setdefault(str(group), []).append(name)
    order = {n: i for names in GROUPS.values() for i, n in enumerate(names)}
    return [(t, sorted(ns, key=lambda n: order.get(n, 1_000))) for t, ns in placed.items() if ns]


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per settings field, grouped, each help line ending with its default and env name.

    Values stay strings here: pydantic parses them with the same rules as env and file values,
    so a bad value gets the same error whatever its source.
    """
    fields = ServerSettings.model_fields
    for title, names in grouped_fields():
        group = parser.add_argument_group(title)
        for name in names:
            info = fields[name]
            text = info.description or DESCRIPTIONS.get(name, "")
            default = DEFAULT_SHOWN.get(name, "unset" if info.default is None else str(info.default))
            text = f"{text} (default: {default}; env {env_of(name)})" if text else \
                f"(default: {default}; env {env_of(name)})"
            if _base_type(info.annotation) is bool:
                group.add_argument(flag_of(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                                   help=text.replace("%", "%%"))
            else:
                group.add_argument(flag_of(name), dest=name, metavar=_metavar(name, info.annotation), default=None,
                                   help=text.replace("%", "%%"))


def _where(name: str, flags: dict[str, Any], config: Path | None, value: Any) -> str:
    """Where a field's value came from, for an error message (flags > env > file)."""
    if flags.get(name) is not None:
        return f"{flag_of(name)} {flags[name]}"
    env = env_of(name)
    if any(k.upper() == env for k in os.environ):
        return f"${env}={value}"
    if config is not None:
        return f"{config}: {name} = {json.dumps(value) if not isinstance(value, str) else repr(value)}"
    return f"{name} = {value!r}"


def _explain(err: dict[str, Any], flags: dict[str, Any], config: Path | None) -> str:
    name = str(err["loc"][0]) if err.get("loc") else "?"
    if err.get("type") == "extra_forbidden":
        close = difflib.get_close_matches(name, list(ServerSettings.model_fields), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return (f"{config or 'settings'}: unknown setting {name!r}; {hint}names are those of "
                "`nexus-sidecar serve --help` with '_' for '-'")
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    msg = msg[:1].lower() + msg[1:]
    return f"{_where(name, flags, config, err.get('input'))}: {msg} (see `nexus-sidecar serve --help`)"


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """Validated settings from the parsed flags, the environment and ``--config``.

    Raises :class:`UsageError` with one line naming the file, variable or flag at fault.
    """
    flags = {n: getattr(args, n, None) for n in ServerSettings.model_fields}
    config = Path(args.config) if getattr(args, "config", None) else None
    if config is not None:
        _check_config_file(config)
    try:
        return load_settings(config, **flags)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise UsageError(_explain(errors[0], flags, config) + more) from None


def _check_config_file(path: Path) -> None:
    """The ``--config`` file exists and parses to a table (TOML for *.toml, else JSON)."""
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "no such file"
        raise UsageError(f"--config {path}: {what}; give a TOML (*.toml) or JSON settings file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config {path}: cannot read it ({exc})") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--config {path}: not valid TOML: {exc}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"--config {path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                         "a TOML file must be named *.toml") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a table of settings (name = value), got {type(data).__name__}")


def effective(settings: ServerSettings, *, device: str, torch_threads: int) -> dict[str, Any]:
    """The values the server actually runs with (secrets redacted): unset knobs resolved."""
    data = settings.redacted()
    data["checkpoint_every"] = settings.checkpoint_cadence
    data["device"] = device
    data["torch_threads"] = torch_threads
    return data
