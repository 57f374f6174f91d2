"""MkDocs hooks: benchmark plots served from where they are committed.

Pages link a plot as ``../benchmarks/results/NAME.png`` (a path that also works when the page is
read on a forge or in an editor). MkDocs only serves files under ``docs/``, so this hook adds every
``benchmarks/results/*.png`` to the site as ``results/NAME.png`` and rewrites those links to it:
one copy of each plot in the repository, no stale duplicates under ``docs/``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LINK = re.compile(r"(?:\.\./)+benchmarks/results/([\w.-]+\.png)")


def on_files(files: Files, config: Any) -> Files:
    """Add the committed benchmark plots to the site under ``results/``."""
    for png in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"results/{png.name}", abs_src_path=str(png)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Point ``../benchmarks/results/X.png`` links at the site's copy, relative to the page."""
    up = "../" * page.file.src_uri.count("/")
    return LINK.sub(lambda m: f"{up}results/{m.group(1)}", markdown)
