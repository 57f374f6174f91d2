"""User errors of the ``nexus-sidecar`` command: one line on stderr, exit code 2.

A :class:`UsageError` is a :class:`SystemExit` (code 2) whose text is the message, so a command
can raise it from anywhere and in-process callers (tests) still see a ``SystemExit`` carrying the
message. :func:`nexus_sidecar.cli.main` prints it as ``nexus-sidecar COMMAND: <what>: <why>; <fix>``.
"""

from __future__ import annotations

EXIT_USAGE = 2


class UsageError(SystemExit):
    """A mistake the user can fix: what was wrong, where it came from, how to fix it."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_USAGE)
        # One line whatever the cause said: a user error is read in a terminal or a pod log.
        self.message = " ".join(message.split())

    def __str__(self) -> str:
        return self.message
