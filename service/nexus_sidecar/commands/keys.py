"""``nexus-sidecar keys``: write API-key lines for the keys file (``serve --keys-file``)."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

from nexus_sidecar.usage import UsageError

HELP = """\
API keys for `nexus-sidecar serve --keys-file FILE`. A keys file has one line per key,
'tenant key [rw|ro]' ('#' starts a comment); keys must be at least 16 characters (shorter ones
are refused at start-up) and are compared in constant time. `keys new` draws 32 random bytes
from the OS (secrets.token_urlsafe: 43 characters) and prints the line, or appends it to --file
(created with mode 0600). A worker sends the key as 'authorization: Bearer <key>'.

Examples:
  nexus-sidecar keys new acme >> keys.txt
  nexus-sidecar keys new acme --ro --file keys.txt     # a read-only key (inspection only)
"""

MIN_KEY_CHARS = 16  # what the server's keys-file parser accepts
KEY_BYTES = 32


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``keys`` parser and ``keys new``."""
    p = sub.add_parser("keys", help="write API keys for --keys-file (keys need >= 16 characters)", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    inner = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    new = inner.add_parser("new", help="a keys-file line with a strong random key", description=HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    new.add_argument("tenant", metavar="TENANT", help="tenant name (no whitespace, ':', '{' or '}')")
    new.add_argument("--ro", action="store_true", help="read-only key (GetSession/ListPolicies and the HTTP views)")
    new.add_argument("--file", type=Path, help="append the line to this keys file instead of printing it")
    new.set_defaults(func=run)


def key_line(tenant: str, read_only: bool = False) -> str:
    """``tenant <random key> rw|ro``; raises :class:`UsageError` for a tenant the server would refuse."""
    from nexus_sidecar.server.stores import validate_id

    try:
        validate_id("tenant", tenant, allow_colon=False)
    except ValueError as exc:
        raise UsageError(f"TENANT {tenant!r}: {exc}; use letters, digits, '-', '_' or '.'") from None
    key = secrets.token_urlsafe(KEY_BYTES)
    assert len(key) >= MIN_KEY_CHARS
    return f"{tenant} {key} {'ro' if read_only else 'rw'}"


def run(args: argparse.Namespace) -> int:
    """Print the new line, or append it to ``--file``."""
    line = key_line(args.tenant, args.ro)
    if args.file is None:
        print(line)
        return 0
    if args.file.is_dir():
        raise UsageError(f"--file {args.file}: is a directory; name the keys file itself")
    try:
        fd = os.open(args.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # keys are secrets
    except OSError as exc:
        raise UsageError(f"--file {args.file}: cannot write it ({exc.strerror})") from None
    with os.fdopen(fd, "a") as out:
        if out.tell() and not args.file.read_bytes().endswith(b"\n"):
            out.write("\n")
        out.write(line + "\n")
    print(f"appended a {'read-only' if args.ro else 'read-write'} key of tenant {args.tenant!r} to {args.file}",
          file=sys.stderr)
    return 0
