"""A bounded, per-process record of what recent sessions retained call by call (for the
retention page, ``/ui/sessions/{id}``).

For each of the ``sessions`` most recently started sessions (or resumed ones, while there is
room) it keeps the last ``calls`` calls: the positions group 0 retained after the call, their
policy memory (the weight the page colours by), and what the call evicted. Positions and
evictions come from the step's output (already on the host); the memory is read on the engine
thread by one job per burst of commits, queued right after the commit, so it is the state after
exactly that step (the engine thread runs jobs in order and the session's next step can only be
queued later). Reading it costs ~65 us per tracked session and call at 4096 slots, which is why
only a few sessions are tracked (``ui_history_sessions``).
"""

from __future__ import annotations

import collections
import functools
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from nexus_sidecar.engine import Engine
from nexus_sidecar.server.answers import HostOutput


class CallRecord:
    """One call of one session, group 0: its keep mask and slot positions as the step answered
    them (copies of one row), read into positions and evictions when the page asks."""

    def __init__(self, step: int, new_tokens: int, keep: np.ndarray, slot_positions: np.ndarray,
                 evicted_all_groups: int) -> None:
        self.step, self.new_tokens = step, new_tokens
        self._keep, self._pos = keep, slot_positions
        self.kept = int(np.count_nonzero(keep))  # retained slots after the call (padding is never kept)
        self.evicted_all_groups = evicted_all_groups
        self.weights: np.ndarray | None = None  # float32 policy memory aligned with ``positions`` (None until read)

    @functools.cached_property
    def positions(self) -> np.ndarray:
        """int64, retained after the call, ascending."""
        return self._pos[self._keep].astype(np.int64, copy=False)

    @functools.cached_property
    def evicted(self) -> np.ndarray:
        """int64, evicted by the call (group 0)."""
        return self._pos[~self._keep & (self._pos >= 0)].astype(np.int64, copy=False)


Key = tuple[str, str]  # (tenant, session id)


class RetentionHistory:
    """Recent calls of recently started sessions; ``sessions=0`` or ``calls=0`` turns it off."""

    def __init__(self, engine: Engine, submit: Callable[[Callable[[], None]], Any], *, sessions: int = 16,
                 calls: int = 64) -> None:
        self.engine = engine
        self.submit = submit  # runs a function on the engine thread, in submission order
        self.max_sessions, self.max_calls = sessions, calls
        self._records: collections.OrderedDict[Key, collections.deque[CallRecord]] = collections.OrderedDict()
        self._pending: list[tuple[int, CallRecord]] = []
        self._queued = False
        self._lock = threading.Lock()  # _pending/_queued are shared with the engine thread

    @property
    def enabled(self) -> bool:
        """False when configured off."""
        return self.max_sessions > 0 and self.max_calls > 0

    def record(self, tenant: str, session_id: str, handle: int, step: int, new_tokens: int, out: HostOutput) -> None:
        """Note a committed step (event-loop thread); its weights are read on the engine thread."""
        self.record_many(tenant, [session_id], [handle], [step], [new_tokens], lambda j: out)

    def record_many(self, tenant: str, session_ids: list[str], handles: list[int], steps: list[int],
                    new_tokens: list[int], output: Callable[[int], HostOutput]) -> None:
        """:meth:`record` for a batch of committed steps of one tenant, ``output(j)`` giving step j's
        output (asked only for the tracked sessions), with one weight-reading job for all of them."""
        if not self.enabled:
            return
        records, full = self._records, len(self._records) >= self.max_sessions
        # Most sessions of a batch are not tracked: one dict lookup each, nothing else.
        pending = [(handles[j], rec) for j, sid in enumerate(session_ids)
                   if ((tenant, sid) in records or steps[j] == 1 or not full)
                   and (rec := self._note(tenant, sid, steps[j], new_tokens[j], output(j))) is not None]
        if not pending:
            return
        with self._lock:
            self._pending.extend(pending)
            if self._queued:
                return
            self._queued = True
        self.submit(self._read_weights)

    def _note(self, tenant: str, session_id: str, step: int, new_tokens: int, out: HostOutput) -> CallRecord | None:
        key = (tenant, session_id)
        calls = self._records.get(key)
        if calls is None:
            # Track a session that starts now (forgetting the oldest-started one beyond the cap), or
            # any while there is room (e.g. one resumed here); never re-admit a forgotten one, which
            # would rotate tracking over every session and cost the weight reads for all of them.
            if step != 1 and len(self._records) >= self.max_sessions:
                return None
            calls = self._records[key] = collections.deque(maxlen=self.max_calls)
            while len(self._records) > self.max_sessions:
                self._records.popitem(last=False)
        keep_all, pos_all = np.asarray(out.keep), np.asarray(out.slot_positions)  # numpy views of host outputs
        if keep_all.shape[0] == 1:  # one group: no padding, every slot not kept was evicted
            gone = keep_all.shape[1] - int(out.retained[0])
        else:
            gone = int((~keep_all & (pos_all >= 0)).sum())
        rec = CallRecord(step, new_tokens, keep_all[0].copy(), pos_all[0].copy(), gone)
        calls.append(rec)
        return rec

    def _read_weights(self) -> None:
        """Engine thread: the policy memory of every pending record's session, as of its step."""
        with self._lock:
            pending, self._pending, self._queued = self._pending, [], False
        # One gather for every pending session; one closed or unloaded meanwhile keeps no weights.
        memories = self.engine.memories(list(dict.fromkeys(h for h, _ in pending)))
        for handle, rec in pending:
            groups = memories.get(handle)
            if groups is None:
                continue
            mem = groups[0].numpy().astype(np.float32, copy=False)  # a fresh array already
            if mem.shape[0] == rec.kept:
                rec.weights = mem

    def calls(self, tenant: str, session_id: str) -> list[CallRecord]:
        """The session's recorded calls, oldest first (empty when it is not tracked)."""
        return list(self._records.get((tenant, session_id), ()))

    def forget(self, tenant: str, session_id: str) -> None:
        """Drop a closed session's record."""
        self._records.pop((tenant, session_id), None)
