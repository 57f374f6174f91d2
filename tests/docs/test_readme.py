"""The README stays a few screens, keeps CI's test command, links only to what exists, and the
worker example on the docs site is the README's (which tests/client/test_readme_example.py runs)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def _python_block_after(text: str, heading: str) -> str:
    assert heading in text, f"lost its {heading!r} section"
    block = re.search(r"```python\n(.*?)```", text[text.index(heading):], re.S)
    assert block is not None
    return block.group(1)


def test_readme_is_a_few_screens() -> None:
    lines = README.read_text().count("\n")
    assert lines <= 250, f"README.md has {lines} lines; move detail to docs/ (the limit is 250)"


def test_readme_keeps_the_two_commands() -> None:
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_relative_links_exist() -> None:
    text = README.read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert local, "no relative links found"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_docs_worker_example_is_the_readmes() -> None:
    readme = _python_block_after(README.read_text(), "## Use it from your own worker")
    docs = _python_block_after((ROOT / "docs" / "worker.md").read_text(), "## Without transformers")
    assert docs == readme, "docs/worker.md's example differs from the README's (which a test executes): copy it over"
