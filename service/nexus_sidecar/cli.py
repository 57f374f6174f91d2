"""The ``nexus-sidecar`` command.

Each subcommand lives in its own module under :mod:`nexus_sidecar.commands` and exposes
``register(subparsers)``; this file only wires them together, so adding a command never
touches the others. Modules import their heavy dependencies lazily inside ``run`` so that
``nexus-sidecar --help`` stays fast.

User errors print one line on stderr (``nexus-sidecar COMMAND: what: why; fix``) and exit with
code 2; ``--debug`` (anywhere on the line) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import traceback
from typing import NoReturn

from nexus_sidecar import commands
from nexus_sidecar.usage import EXIT_USAGE, UsageError

DESCRIPTION = """\
Nexus eviction sidecar: decides which KV-cache tokens an LLM worker evicts, using Nexus
Sampling (a walk over recorded attention that surfaces bridge tokens, plus weighted
reservoir sampling) or one of the classic top-K baselines.

Typical first steps:
  nexus-sidecar demo                 run the service in-process against simulated workers
  nexus-sidecar serve --help         run the gRPC service (memory or Redis store)
  nexus-sidecar bench survival --quick --json out/survival.json

Add --debug to any command for a Python traceback instead of the one-line error message.
"""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (not the whole usage block)."""

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: error: MESSAGE (see PROG --help)`` and exit with code 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every subcommand found in ``nexus_sidecar.commands``."""
    parser = OneLineParser(
        prog="nexus-sidecar",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks of errors")
    return parser


def _report(command: str, message: str) -> None:
    """``nexus-sidecar COMMAND: message`` on stderr (commands that already prefix their name keep it)."""
    line = " ".join(message.split())
    prefix = "nexus-sidecar " if line.startswith(f"{command}: ") else f"nexus-sidecar {command}: "
    print(prefix + line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script.

    A :class:`UsageError`, or a ``SystemExit`` carrying a message, is printed as one line and
    re-raised as a ``UsageError`` (exit code 2). Any other exception is one line too, exit code 1,
    unless ``--debug`` asks for the traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted after the subcommand too
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except SystemExit as exc:
        message = exc.message if isinstance(exc, UsageError) else exc.code if isinstance(exc.code, str) else None
        if message is None:
            raise
        if debug:  # a SystemExit never prints its traceback by itself
            traceback.print_exception(exc)
        _report(args.command, message)
        raise UsageError(message) from None
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if debug:
            raise
        _report(args.command, f"unexpected error: {type(exc).__name__}: {exc} (rerun with --debug for the "
                              "traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
