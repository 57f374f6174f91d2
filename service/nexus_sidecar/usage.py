"""User errors of the ``nexus-sidecar`` command: one line on stderr, exit code 2.

A :class:`UsageError` is a :class:`SystemExit` (code 2) whose text is the message, so a command
can raise it from anywhere and in-process callers (tests) still see a ``SystemExit`` carrying the
message. :func:`nexus_sidecar.cli.main` prints it as ``nexus-sidecar COMMAND: <what>: <why>; <fix>``.
"""

from __future__ import annotations

import argparse

EXIT_USAGE = 2


class UsageError(SystemExit):
    """A mistake the user can fix: what was wrong, where it came from, how to fix it."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_USAGE)
        # One line whatever the cause said: a user error is read in a terminal or a pod log.
        self.message = " ".join(message.split())

    def __str__(self) -> str:
        return self.message


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a bad one is argparse's own one-line error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def check_cuda_device(flag: str, device: str) -> None:
    """A CUDA device that torch cannot see is a user error, not a crash at the first step."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"{flag} {device}: torch sees no CUDA device here; use {flag} cpu")
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise UsageError(f"{flag} {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
