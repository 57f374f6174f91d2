"""Tenancy: the tenant comes from the credential, never from the payload.

Keys file format (a file, or a Kubernetes Secret mounted as one), one key per line::

    # tenant   key                          scope (rw = default, ro = read-only)
    acme       9f2c...                      rw
    globex     77ab...                      ro

Keys are compared in constant time against every configured key (no early exit), so timing
does not reveal which prefix matched. With no keys file the server is single-tenant
(``default``) and says so at start-up.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from nexus_sidecar.server.errors import PermissionDenied, Unauthenticated
from nexus_sidecar.server.stores import validate_id

DEFAULT_TENANT = "default"


# Keys that are examples, not secrets: a deployment that still carries one must not start.
_PLACEHOLDER = re.compile(r"replace[-_]?me|change[-_]?me|example|placeholder", re.IGNORECASE)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant and whether it may change state."""

    tenant: str
    can_write: bool = True

    def require_write(self) -> None:
        """Raise PERMISSION_DENIED for read-only credentials."""
        if not self.can_write:
            raise PermissionDenied(f"tenant {self.tenant!r}: this key is read-only")


@dataclass(frozen=True)
class _Key:
    secret: bytes
    principal: Principal


class KeyRing:
    """API keys -> principals. An empty ring means single-tenant mode."""

    def __init__(self, keys: list[tuple[str, str, str]] | None = None) -> None:
        self._keys = [_Key(k.encode(), Principal(validate_id("tenant", t, allow_colon=False), scope != "ro"))
                      for t, k, scope in (keys or [])]

    @property
    def single_tenant(self) -> bool:
        """True when no keys are configured (everyone is tenant ``default``)."""
        return not self._keys

    @property
    def tenants(self) -> list[str]:
        """Configured tenants (sorted)."""
        return sorted({k.principal.tenant for k in self._keys})

    @classmethod
    def from_file(cls, path: str | Path) -> KeyRing:
        """Parse a keys file; raises ValueError naming the line on a malformed entry."""
        keys = []
        for lineno, raw in enumerate(Path(path).read_text().splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("rw", "ro")):
                raise ValueError(f"{path}:{lineno}: expected 'tenant key [rw|ro]'")
            if len(parts[1]) < 16:
                raise ValueError(f"{path}:{lineno}: key shorter than 16 characters")
            if _PLACEHOLDER.search(parts[1]):
                raise ValueError(f"{path}:{lineno}: placeholder key (an example that must be replaced); "
                                 "generate a real one with `nexus-sidecar keys new TENANT`")
            keys.append((parts[0], parts[1], parts[2] if len(parts) == 3 else "rw"))
        return cls(keys)

    def authenticate(self, authorization: str | None) -> Principal:
        """Map an ``authorization`` header value (``Bearer <key>``) to a principal."""
        if self.single_tenant:
            return Principal(DEFAULT_TENANT)
        if not authorization:
            raise Unauthenticated("missing 'authorization: Bearer <key>' metadata")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization must be 'Bearer <key>'")
        presented = token.strip().encode()
        found: Principal | None = None
        for key in self._keys:  # no early exit: constant work whatever matches
            if hmac.compare_digest(key.secret, presented):
                found = key.principal
        if found is None:
            raise Unauthenticated("unknown API key")
        return found
