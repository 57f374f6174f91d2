"""Subcommands of ``nexus-sidecar``: one module each, exposing ``register(subparsers)``."""
