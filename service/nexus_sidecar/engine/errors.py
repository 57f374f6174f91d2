"""Engine exceptions. Each names the offending field and the reason, so the server can map
them to gRPC status codes (INVALID_ARGUMENT etc.) in one place without parsing messages."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class FieldError(EngineError):
    """An error about one named field: ``field`` says which, ``reason`` says why."""

    kind = "invalid"

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class ConfigError(FieldError):
    """A policy configuration value is out of range or inconsistent."""


class InputError(FieldError):
    """A step's input (shape, dtype, value) is invalid; nothing was changed."""


class StateError(FieldError):
    """A serialized state blob is corrupt, truncated or of an unknown version."""


class UnknownPolicyError(ConfigError):
    """The policy name is not in the registry."""
