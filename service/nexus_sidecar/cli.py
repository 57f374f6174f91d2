"""The ``nexus-sidecar`` command.

Each subcommand lives in its own module under :mod:`nexus_sidecar.commands` and exposes
``register(subparsers)``; this file only wires them together, so adding a command never
touches the others. Modules import their heavy dependencies lazily inside ``run`` so that
``nexus-sidecar --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from nexus_sidecar import commands

DESCRIPTION = """\
Nexus eviction sidecar: decides which KV-cache tokens an LLM worker evicts, using Nexus
Sampling (a walk over recorded attention that surfaces bridge tokens, plus weighted
reservoir sampling) or one of the classic top-K baselines.

Typical first steps:
  nexus-sidecar demo                 run the service in-process against simulated workers
  nexus-sidecar serve --help         run the gRPC service (memory or Redis store)
  nexus-sidecar bench survival --quick --json out/survival.json
"""


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every subcommand found in ``nexus_sidecar.commands``."""
    parser = argparse.ArgumentParser(
        prog="nexus-sidecar",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
