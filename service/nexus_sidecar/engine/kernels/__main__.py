"""``python -m nexus_sidecar.engine.kernels``: build the fused CPU kernels now (what ``make install`` runs)."""

from __future__ import annotations

import sys

from nexus_sidecar.engine.kernels.loader import build, build_dir


def main() -> int:
    """Build (or find) the extension and report where it lives; exit 1 with the error if it fails."""
    try:
        mod = build(verbose="-v" in sys.argv[1:])
    except Exception as exc:
        print(f"fused kernels: build failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"fused kernels: {mod.__file__} (build dir {build_dir()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
