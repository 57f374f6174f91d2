"""Seeded RULER-style task generators (no downloads): needles hidden in a haystack, then a question.

Every generator returns :class:`Sample` objects whose ``context`` is what streams through the cache
first, ``question`` what arrives after it, and ``answers`` the strings the reply must contain. A
sample is a pure function of ``(task, haystack, length, split, index)``: the RNG is seeded with that
tuple as a string (Python's ``random`` hashes string seeds with SHA-512, independent of
``PYTHONHASHSEED``), so the dev and test splits never share a sample and a rerun regenerates the
same prompts.

Tasks (after RULER, Hsieh et al. 2024, simplified for a 135M model):

- ``passkey``: one pass key (5 digits) in the haystack.
- ``multikey``: four needles "special magic number for <key>"; two keys are asked, one question
  each, from one compressed context (the other two needles are distractors).
- ``multivalue``: one key with ``3`` values scattered; all must be recalled.
- ``multiquery``: ``3`` keys, one value each; each is its own question about one compressed context.
- ``vartrack``: a chain ``VAR A = 12345. ... VAR B = VAR A. ... VAR C = VAR B.``; the question asks
  the value of the last variable. The middle links are *bridge tokens*: nothing in the question
  mentions them, but the answer needs them.
- ``cwe``: common-words extraction: a numbered word list where ``3`` words occur
  ``max(4, length // 64)`` times and the rest twice; the three most common words must be named.

- ``turnkeys`` (for the ``multiturn`` setting): a conversation of ``6`` context chunks with one
  needle each; after every chunk from the second on, one question turn asks a key not asked
  before, drawn uniformly from *every chunk so far* (so a turn may ask about the first chunk after
  four more have streamed by, and no policy can know which needle comes next: every turn has at
  least two candidates); the needle left unasked is a distractor. In one-shot settings the same
  sample is the chunks joined as one context, its five questions asked after it.

A task name may carry a haystack: ``passkey-stdlib`` (natural text) vs ``passkey`` (RULER noise).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from nexus_sidecar.evals.haystacks import HAYSTACKS, haystack_sentences

CountTokens = Callable[[str], int]

BASE_TASKS = ("passkey", "multikey", "multivalue", "multiquery", "vartrack", "cwe", "turnkeys")
SPLITS = ("dev", "test")
# Bumped whenever the same (task, length, split, index) would yield a different sample; part of
# every run key (runner.EvalSettings.fingerprint), so a results log never mixes two generators.
# 2: keys no longer depend on the process's string hash seed (version 1 logs are not reproducible).
GENERATOR_VERSION = 2
# Tasks added after version 2 carry their own generator version in their sample id
# (``turnkeys/v1/2048/dev/0``), so adding one never changes the run keys of existing logs.
TASK_VERSIONS = {"turnkeys": 1}
# turnkeys layout, chosen on dev by dense accuracy (docs/evaluation.md): with two needles per chunk
# dense SmolLM2 confused the two and repeated earlier answers (0.42, 12 questions); one per chunk, 1.00.
TURN_CHUNKS = 6  # context chunks per conversation
TURN_NEEDLES = 1  # needles per chunk
TURN_FIRST_ASK = 1  # the first chunk after which a question turn comes (one turn after each from there)
TURN_CLOSING = 0  # question turns after the last chunk, beyond the one that follows it

# Small fixed vocabularies keep the generators dependency-free and deterministic.
ADJECTIVES = (
    "ancient", "bitter", "brave", "calm", "clever", "crimson", "curious", "damp", "eager", "fancy", "fierce",
    "gentle", "golden", "hollow", "humble", "icy", "jolly", "kind", "lively", "lonely", "mighty", "noisy",
    "odd", "polite", "proud", "quiet", "rapid", "rusty", "shiny", "silent", "silver", "sleepy", "smooth",
    "steady", "sturdy", "swift", "tender", "tiny", "vivid", "wise",
)  # fmt: skip
NOUNS = (
    "anchor", "badger", "basket", "beacon", "canyon", "castle", "cedar", "comet", "compass", "dolphin",
    "falcon", "forest", "garden", "glacier", "harbor", "island", "lantern", "meadow", "mirror", "orchard",
    "otter", "pebble", "pepper", "planet", "quarry", "raven", "river", "saddle", "spruce", "summit",
    "teapot", "thunder", "tiger", "tulip", "valley", "violin", "walnut", "willow", "window", "zebra",
)  # fmt: skip
CWE_WORDS = (
    "apple", "bread", "chair", "cloud", "dance", "eagle", "flame", "grape", "horse", "juice", "knife",
    "lemon", "money", "night", "ocean", "paper", "queen", "radio", "sheep", "table", "uncle", "voice",
    "water", "youth", "bottle", "candle", "doctor", "engine", "finger", "guitar", "hammer", "jacket",
    "kitten", "ladder", "marble", "needle", "onion", "pillow", "rabbit", "silver", "tomato", "wallet",
    "button", "carpet", "dragon", "feather", "helmet", "island", "jungle", "kettle", "lizard", "magnet",
    "napkin", "parrot", "rocket", "shadow", "ticket", "velvet", "wizard", "yogurt",
)  # fmt: skip

NIAH_PREAMBLE = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards."
)


@dataclass(frozen=True)
class Question:
    """One question about a sample's context: its text, the strings the reply must contain, and the
    answer prefix appended after it (inside the assistant turn) to steer the format."""

    question: str
    answers: tuple[str, ...]
    answer_prefix: str = ""


@dataclass(frozen=True)
class Turn:
    """One turn of a multi-turn conversation: a context chunk, then the questions (indices into
    :attr:`Sample.questions`) asked right after it, each answered before the next."""

    text: str
    asks: tuple[int, ...] = ()


@dataclass(frozen=True)
class Sample:
    """One evaluation prompt.

    ``metric``: ``match_all`` (fraction of ``answers`` found in the reply, RULER's string_match_all),
    ``match_any`` (1 if any answer is found), or a LongBench metric (see :mod:`.longbench`).
    ``answer_prefix`` is appended after the question (inside the assistant turn) to steer the format.
    """

    task: str
    sample_id: str
    context: str
    question: str
    answers: tuple[str, ...]
    metric: str
    max_new_tokens: int
    answer_prefix: str = ""
    meta: dict[str, object] = field(default_factory=dict, compare=False)
    followups: tuple[Question, ...] = ()  # more questions answered from the same compressed context
    # The conversation the multiturn setting streams (chunks and question turns interleaved); empty:
    # one turn, the whole context then every question. ``context`` is always the chunks joined.
    turns: tuple[Turn, ...] = ()

    @property
    def conversation(self) -> list[Turn]:
        """The turns the multiturn setting streams (one turn for a sample without its own)."""
        return list(self.turns) or [Turn(self.context, tuple(range(len(self.questions))))]

    @property
    def questions(self) -> list[Question]:
        """Every question of the sample, the first one first."""
        return [Question(self.question, self.answers, self.answer_prefix), *self.followups]


def approx_tokens(text: str) -> int:
    """A tokenizer-free length estimate (about 4 characters per token) for tests and planning."""
    return max(1, len(text) // 4)


def parse_task(name: str) -> tuple[str, str]:
    """Split ``'passkey-stdlib'`` into ``('passkey', 'stdlib')``; no suffix means the ``noise`` haystack."""
    base, _, hay = name.partition("-")
    hay = hay or "noise"
    if base not in BASE_TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(BASE_TASKS)} (optionally -<haystack>)")
    if hay not in HAYSTACKS:
        raise ValueError(f"task {name!r}: unknown haystack {hay!r}; known: {', '.join(HAYSTACKS)}")
    return base, hay


def _number(rng: random.Random, used: set[int]) -> int:
    while True:
        v = rng.randrange(10000, 100000)
        if v not in used:
            used.add(v)
            return v


def _keys(rng: random.Random, n: int) -> list[str]:
    seen: set[str] = set()
    while len(seen) < n:
        seen.add(f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}")
    # Shuffle from a sorted list: a set's iteration order follows the per-process string hash seed
    # (PYTHONHASHSEED), which made every process generate different keys for the same sample id.
    return sorted(sorted(seen), key=lambda _: rng.random())


def _hide(
    rng: random.Random, needles: list[str], length: int, count: CountTokens, haystack: str, ordered: bool = False
) -> str:
    """Haystack of about ``length`` tokens with ``needles`` inserted at random sentence boundaries.

    ``ordered`` keeps the needles in the given order (the variable chain must be defined before use).
    """
    budget = length - sum(count(" " + n) for n in needles) - count(NIAH_PREAMBLE)
    start = rng.randrange(1 << 30)
    filler = haystack_sentences(haystack, max(budget, 0), count, start=start)
    # Depths strictly inside the haystack, as RULER spreads needles over 0-100 % depth.
    slots = sorted(rng.randrange(0, len(filler) + 1) for _ in needles)
    order = list(needles) if ordered else rng.sample(list(needles), len(needles))
    parts: list[str] = []
    i = 0
    for slot, needle in zip(slots, order, strict=True):
        parts.extend(filler[i:slot])
        parts.append(needle)
        i = slot
    parts.extend(filler[i:])
    return NIAH_PREAMBLE + "\n" + " ".join(parts)


def _magic(key: str, value: int) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _ask_magic(key: str, value: int) -> tuple[str, tuple[str, ...], str]:
    q = f"What is the special magic number for {key} mentioned in the provided text?"
    return q, (str(value),), f"The special magic number for {key} mentioned in the provided text is"


def generate_sample(task: str, length: int, split: str, index: int, count: CountTokens = approx_tokens) -> Sample:
    """Build sample ``index`` of ``task`` (e.g. ``'multikey-stdlib'``) at about ``length`` context tokens."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if length < 64:
        raise ValueError(f"length must be >= 64 tokens, got {length}")
    base, hay = parse_task(task)
    rng = random.Random(f"{base}|{hay}|{length}|{split}|{index}")
    used: set[int] = set()
    version = f"/v{TASK_VERSIONS[base]}" if base in TASK_VERSIONS else ""
    sid = f"{task}{version}/{length}/{split}/{index}"
    if base == "turnkeys":
        return _turnkeys(task, sid, rng, used, length, count, hay)
    if base == "passkey":
        v = _number(rng, used)
        needle = f"The pass key is {v}. Remember it. {v} is the pass key."
        ctx = _hide(rng, [needle], length, count, hay).replace(NIAH_PREAMBLE, _PASSKEY_PREAMBLE)
        return Sample(task, sid, ctx, "What is the pass key?", (str(v),), "match_all", 8, "The pass key is")
    if base == "multikey":
        keys = _keys(rng, 4)
        vals = [_number(rng, used) for _ in keys]
        ctx = _hide(rng, [_magic(k, v) for k, v in zip(keys, vals, strict=True)], length, count, hay)
        # Two of the four keys are asked, one question each, from one compressed context; the other
        # needles stay distractors for both.
        (q, a, pre), follow = (_ask_magic(k, v) for k, v in zip(keys[:2], vals[:2], strict=True))
        return Sample(task, sid, ctx, q, a, "match_all", 8, pre, {"distractors": vals[2:]},
                      followups=(Question(*follow),))  # fmt: skip
    if base == "multivalue":
        (k,) = _keys(rng, 1)
        vals = [_number(rng, used) for _ in range(3)]
        ctx = _hide(rng, [_magic(k, v) for v in vals], length, count, hay)
        q = f"What are all the special magic numbers for {k} mentioned in the provided text?"
        pre = f"The special magic numbers for {k} mentioned in the provided text are"
        return Sample(task, sid, ctx, q, tuple(str(v) for v in vals), "match_all", 24, pre)
    if base == "multiquery":
        keys = _keys(rng, 3)
        vals = [_number(rng, used) for _ in keys]
        ctx = _hide(rng, [_magic(k, v) for k, v in zip(keys, vals, strict=True)], length, count, hay)
        # kvpress's multi-question protocol: each key is its own question about one compressed context.
        asked = [_ask_magic(k, v) for k, v in zip(keys, vals, strict=True)]
        (q, a, pre), *rest = asked
        return Sample(task, sid, ctx, q, a, "match_all", 8, pre, followups=tuple(Question(*x) for x in rest))
    if base == "vartrack":
        names: list[str] = []
        while len(names) < 3:  # three distinct 5-letter names: a value and a chain of two hops
            n = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            if n not in names:
                names.append(n)
        v = _number(rng, used)
        chain = [f"VAR {names[0]} = {v}."] + [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(names)]
        ctx = _hide(rng, chain, length, count, hay, ordered=True).replace(NIAH_PREAMBLE, _VAR_PREAMBLE)
        q = f"What is the value of VAR {names[-1]}?"
        return Sample(task, sid, ctx, q, (str(v),), "match_all", 8, f"The value of VAR {names[-1]} is",
                      {"chain": names})  # fmt: skip
    # cwe: the haystack plays no role (the word list is the context), so '-stdlib' only renames the task.
    words = rng.sample(list(CWE_WORDS), len(CWE_WORDS))
    common, rare = words[:3], words[3:]
    freq = max(4, length // 64)  # common words: 8 times each at 512 tokens; rare words: twice
    items: list[str] = [w for w in common for _ in range(freq)]
    budget = length - count(_CWE_PREAMBLE)
    # Entries are budgeted with their real list numbers ("117. apple" costs more than "1. apple").
    used_tokens = sum(count(f" {i + 1}. {w}") for i, w in enumerate(items))
    r = 0
    while used_tokens < budget:  # rare words twice each (cycling the pool) until the length is reached
        w = rare[r % len(rare)]
        items += [w, w]
        used_tokens += count(f" {len(items) - 1}. {w}") + count(f" {len(items)}. {w}")
        r += 1
    rng.shuffle(items)
    ctx = _CWE_PREAMBLE + "\n" + " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
    q = "What are the 3 most common words in the above list?"
    return Sample(task, sid, ctx, q, tuple(common), "match_all", 16, "The 3 most common words in the list are:")


def _turnkeys(task: str, sid: str, rng: random.Random, used: set[int], length: int, count: CountTokens,
              hay: str) -> Sample:  # fmt: skip
    """A conversation: chunks with needles, a question turn after each about any chunk so far."""
    keys = _keys(rng, TURN_CHUNKS * TURN_NEEDLES)
    vals = [_number(rng, used) for _ in keys]
    chunk_of = [i // TURN_NEEDLES for i in range(len(keys))]
    per_chunk = max(64, (length - count(NIAH_PREAMBLE)) // TURN_CHUNKS)
    texts = []
    for c in range(TURN_CHUNKS):
        needles = [_magic(keys[i], vals[i]) for i in range(len(keys)) if chunk_of[i] == c]
        text = _hide(rng, needles, per_chunk + count(NIAH_PREAMBLE), count, hay)
        texts.append(text if c == 0 else text.removeprefix(NIAH_PREAMBLE + "\n"))
    asked: list[int] = []  # key indices in the order they are asked
    after: list[int] = []  # the chunk each question follows
    for c in range(TURN_FIRST_ASK, TURN_CHUNKS):
        pool = [i for i in range(len(keys)) if chunk_of[i] <= c and i not in asked]
        asked.append(rng.choice(pool))
        after.append(c)
    for _ in range(TURN_CLOSING):
        asked.append(rng.choice([i for i in range(len(keys)) if i not in asked]))
        after.append(TURN_CHUNKS - 1)
    qs = [Question(*_ask_magic(keys[i], vals[i])) for i in asked]
    asks = [tuple(q for q, a in enumerate(after) if a == c) for c in range(TURN_CHUNKS)]
    turns = tuple(Turn(t, a) for t, a in zip(texts, asks, strict=True))
    meta = {"key_chunk": [chunk_of[i] for i in asked], "asked_after": after,
            "distractors": [vals[i] for i in range(len(keys)) if i not in asked]}  # fmt: skip
    first, *rest = qs
    return Sample(task, sid, "\n\n".join(texts), first.question, first.answers, "match_all", 8, first.answer_prefix,
                  meta, followups=tuple(rest), turns=turns)  # fmt: skip


_PASSKEY_PREAMBLE = (
    "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the pass key there."
)
_VAR_PREAMBLE = "Memorize and track the chain of variable assignments hidden in the following text."
_CWE_PREAMBLE = "Below is a numbered list of words. Some words appear more often than others. Memorize the list."


def generate_samples(
    tasks: list[str], length: int, split: str, n: int, count: CountTokens = approx_tokens, start: int = 0
) -> list[Sample]:
    """``n`` samples (indices ``start .. start+n-1``) of every task in ``tasks``, task-major order."""
    return [generate_sample(t, length, split, start + i, count) for t in tasks for i in range(n)]
