"""Filler text ("haystacks") that the task generators hide their needles in. Nothing is downloaded.

- ``noise``: RULER's repeated-sentence noise ("The grass is green. The sky is blue. ...").
- ``stdlib``: natural English prose taken from the docstrings of a fixed list of Python standard
  library modules, read from the running interpreter (``module.__doc__``). Licence: the Python
  Software Foundation License (PSF-2.0), which permits reproduction and derivative works; the text
  ships with every CPython. Docstrings can change between Python versions, so :func:`haystack_digest`
  fingerprints the exact text and the evaluation records it with its results.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from collections.abc import Callable
from functools import lru_cache

NOISE_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

# Modules with long, prose-like docstrings (few code listings). Order matters: it fixes the text.
STDLIB_MODULES = (
    "argparse", "asyncio", "collections", "csv", "decimal", "difflib", "doctest", "email", "fractions",
    "ftplib", "functools", "heapq", "imaplib", "inspect", "locale", "logging", "mailbox", "pickle",
    "pydoc", "random", "shlex", "shutil", "smtplib", "socketserver", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "trace", "turtle",
    "typing", "unittest", "uuid", "warnings", "weakref", "zipfile",
)  # fmt: skip

HAYSTACKS = ("noise", "stdlib")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


@lru_cache(maxsize=1)
def stdlib_sentences() -> tuple[str, ...]:
    """Prose sentences from the docstrings of :data:`STDLIB_MODULES` (code-like lines dropped)."""
    sentences: list[str] = []
    for name in STDLIB_MODULES:
        try:
            doc = importlib.import_module(name).__doc__ or ""
        except Exception:
            continue
        # Keep prose lines only: drop doctest/code lines and lines that look like tables or signatures.
        lines = [ln.strip() for ln in doc.splitlines()]
        prose = " ".join(ln for ln in lines if ln and not ln.startswith((">>>", "...", "$", "-", "=", "|", "*"))
                         and "(" not in ln[:1])  # fmt: skip
        for s in _SENTENCE_END.split(re.sub(r"\s+", " ", prose)):
            s = s.strip()
            # Short fragments and sentences with digits are dropped: digits would be false needles.
            if len(s.split()) >= 5 and s[-1] in ".!?" and not re.search(r"\d", s):
                sentences.append(s)
    if len(sentences) < 50:
        raise RuntimeError(f"only {len(sentences)} stdlib docstring sentences found; the haystack needs >= 50")
    return tuple(sentences)


def haystack_digest(kind: str) -> str:
    """SHA-256 (first 16 hex digits) of the full sentence pool of haystack ``kind``."""
    pool = _pool(kind)
    return hashlib.sha256("\n".join(pool).encode()).hexdigest()[:16]


def _pool(kind: str) -> tuple[str, ...]:
    if kind == "noise":
        return NOISE_SENTENCES
    if kind == "stdlib":
        return stdlib_sentences()
    raise ValueError(f"unknown haystack {kind!r}; known: {', '.join(HAYSTACKS)}")


def haystack_sentences(kind: str, n_tokens: int, count_tokens: Callable[[str], int], start: int = 0) -> list[str]:
    """Consecutive sentences of ``kind`` (cycling, from index ``start``) totalling >= ``n_tokens`` tokens.

    ``count_tokens`` measures one sentence (with its leading space); the sum over sentences is what
    the generators budget with, so the final prompt length is close to, not exactly, the target.
    """
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    pool = _pool(kind)
    out: list[str] = []
    total = 0
    i = start % len(pool)
    while total < n_tokens:
        s = pool[i]
        total += max(1, count_tokens(" " + s))
        out.append(s)
        i = (i + 1) % len(pool)
    return out
