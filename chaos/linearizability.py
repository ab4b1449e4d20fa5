"""Linearizability checker: Wing & Gong / Lowe's search (WGL), as in Knossos and Porcupine.

Why it is built this way:
- Keys are independent objects, and a history is linearizable iff every per-object
  sub-history is (locality), so each key is searched alone: the cost is exponential in
  the concurrency on one key, not in the length of the whole history.
- The search linearizes one op at a time, any op whose invoke precedes the earliest
  pending completion, and backtracks on a dead end. (linearized-set, model-state) pairs
  already explored are memoised: reaching one again cannot lead anywhere new.
- A "fail" op is dropped. An "unknown" op has no completion event: it may be linearized
  at any point after its invoke, or never; the search succeeds once every ok op is placed.
- Memoised configurations are capped per key. Hitting the cap gives the verdict
  "unknown: budget exceeded", never "ok": only a finished search may claim success.

Pure: no I/O, no clocks. Equal timestamps count as overlapping (a completion at t and an
invoke at t may be ordered either way), so clock resolution cannot invent a violation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable

from .history import FAIL, OK, Operation, partition
from .models import Model

DEFAULT_MAX_STATES = 500_000

VERDICT_OK, VERDICT_FAIL, VERDICT_UNKNOWN = "ok", "fail", "unknown"
REASON_NOT_LINEARIZABLE = "not linearizable"
REASON_BUDGET = "budget exceeded"


@dataclass(frozen=True)
class PartitionResult:
    """Outcome for one key.

    linearization: a full witness order when ok; otherwise the longest linearizable prefix found.
    state:         model state after `linearization`.
    stuck:         (fail) the earliest-completing ok op that no order could place.
    unlinearized:  (fail) ops not in the prefix that were invoked before `stuck` completed:
                   the candidates, none of which led to a complete linearization.
    explored:      memoised configurations, to compare against the budget.
    """

    key: str
    verdict: str
    reason: str = ""
    linearization: tuple[Operation, ...] = ()
    state: Any = None
    stuck: Operation | None = None
    unlinearized: tuple[Operation, ...] = ()
    explored: int = 0
    model: Model | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.verdict == VERDICT_OK

    @property
    def result(self) -> str:
        """'ok', 'fail: not linearizable' or 'unknown: budget exceeded'."""
        return self.verdict if not self.reason else f"{self.verdict}: {self.reason}"

    def explain(self) -> str:
        lines = [f"key {self.key!r}: {self.result} ({self.explored} states explored)"]
        if self.ok:
            return lines[0]
        lines.append(f"  longest linearizable prefix ({len(self.linearization)} ops), "
                     f"model state after it: {self.state!r}")
        lines += [f"    {op.describe()}" for op in self.linearization]
        if self.stuck is not None:
            lines.append(f"  no order places, before it completes: {self.stuck.describe()}")
            lines.append("  ops not yet placed that were invoked by then:")
            lines += [f"    {op.describe()}  <- {self._verdict_from_state(op)}" for op in self.unlinearized]
        return "\n".join(lines)

    def _verdict_from_state(self, op: Operation) -> str:
        if self.model is None:
            return ""
        ok, _ = self.model.step(self.state, op)
        return "fits this state, but every order after it dead-ends" if ok else "impossible in this state"


@dataclass(frozen=True)
class CheckResult:
    """Outcome for a whole history: one PartitionResult per key."""

    partitions: dict[str, PartitionResult]

    @property
    def verdict(self) -> str:
        """fail if any key failed, else unknown if any key was not finished, else ok."""
        verdicts = {p.verdict for p in self.partitions.values()}
        for v in (VERDICT_FAIL, VERDICT_UNKNOWN):
            if v in verdicts:
                return v
        return VERDICT_OK

    @property
    def ok(self) -> bool:
        return self.verdict == VERDICT_OK

    @property
    def failures(self) -> list[PartitionResult]:
        return [p for p in self.partitions.values() if p.verdict == VERDICT_FAIL]

    @property
    def unknowns(self) -> list[PartitionResult]:
        return [p for p in self.partitions.values() if p.verdict == VERDICT_UNKNOWN]

    def explain(self) -> str:
        bad = self.failures + self.unknowns
        head = f"{self.verdict}: {len(self.partitions)} key(s), {len(self.failures)} failed, {len(self.unknowns)} unknown"
        return "\n".join([head] + [p.explain() for p in bad])


ModelSpec = Model | Callable[[str], Model]


def check(history: Iterable[Operation], model: ModelSpec, *, max_states: int = DEFAULT_MAX_STATES) -> CheckResult:
    """Check every key of `history` independently. `model` is one Model for all keys, or a
    function key -> Model for workloads mixing object kinds. `max_states` is per key."""
    results = {}
    for key, ops in partition(history).items():
        m = model if hasattr(model, "step") else model(key)
        results[key] = check_partition(key, ops, m, max_states=max_states)
    return CheckResult(results)


def check_partition(key: str, ops: Iterable[Operation], model: Model, *,
                    max_states: int = DEFAULT_MAX_STATES) -> PartitionResult:
    """Check one key's operations (all assumed to share `key`)."""
    ops = _relevant(ops, model)
    verdict, order, state, explored = _search(ops, model, max_states)
    linearization = tuple(ops[i] for i in order)
    if verdict == VERDICT_OK:
        return PartitionResult(key, VERDICT_OK, "", linearization, state, explored=explored, model=model)
    if verdict == VERDICT_UNKNOWN:
        return PartitionResult(key, VERDICT_UNKNOWN, REASON_BUDGET, linearization, state,
                               explored=explored, model=model)
    stuck, pending = _frontier(ops, set(order))
    return PartitionResult(key, VERDICT_FAIL, REASON_NOT_LINEARIZABLE, linearization, state,
                           stuck, pending, explored, model)


def _relevant(ops: Iterable[Operation], model: Model) -> list[Operation]:
    """Drop ops that cannot matter: fail ops (never happened), unknown read-only ops (no
    effect, no observation), and unknown ops invoked after every ok op completed (they can
    always be placed last)."""
    ops = [op for op in ops if op.status != FAIL]
    last = max((op.complete for op in ops if op.status == OK), default=None)
    keep = [op for op in ops
            if op.status == OK
            or (op.f not in getattr(model, "read_only", ()) and last is not None and op.invoke <= last)]
    return sorted(keep, key=lambda op: op.invoke)


class _Entry:
    """A call or return event in a doubly linked list ordered by time; lifting an op
    unlinks both its events, unlifting restores them (reverse order, LIFO)."""

    __slots__ = ("index", "bit", "is_call", "match", "prev", "next")

    def __init__(self, index: int, is_call: bool):
        self.index = index
        self.bit = 1 << index if index >= 0 else 0  # -1: the list head
        self.is_call = is_call
        self.match: _Entry | None = None  # call <-> return; None for unknown calls
        self.prev: _Entry | None = None
        self.next: _Entry | None = None


def _event_list(ops: list[Operation]) -> _Entry:
    events = []
    for i, op in enumerate(ops):
        call = _Entry(i, True)
        events.append((op.invoke, 0, i, call))
        if op.status == OK:
            ret = _Entry(i, False)
            call.match, ret.match = ret, call
            events.append((op.complete, 1, i, ret))
    events.sort(key=lambda e: e[:3])  # calls before returns at equal times: treat as overlapping
    head = prev = _Entry(-1, False)
    for *_, entry in events:
        prev.next, entry.prev = entry, prev
        prev = entry
    return head


def _lift(e: _Entry) -> None:
    e.prev.next = e.next
    if e.next is not None:
        e.next.prev = e.prev
    m = e.match
    if m is not None:
        m.prev.next = m.next
        if m.next is not None:
            m.next.prev = m.prev


def _unlift(e: _Entry) -> None:
    m = e.match
    if m is not None:
        m.prev.next = m
        if m.next is not None:
            m.next.prev = m
    e.prev.next = e
    if e.next is not None:
        e.next.prev = e


def _search(ops: list[Operation], model: Model, max_states: int) -> tuple[str, tuple[int, ...], Hashable, int]:
    """WGL with memoisation. Returns (verdict, order, state, explored): on ok the witness
    order; otherwise the deepest prefix reached, recorded where the search had to back up."""
    head = _event_list(ops)
    remaining = sum(op.status == OK for op in ops)
    state: Hashable = model.init()
    linearized = 0
    stack: list[tuple[_Entry, Hashable]] = []  # (lifted call, state before it)
    seen: set[tuple[int, Hashable]] = set()
    best: tuple[tuple[int, ...], Hashable] = ((), state)

    def deepest():
        return best if len(best[0]) >= len(stack) else (tuple(e.index for e, _ in stack), state)

    entry = head.next
    while remaining:
        if entry.is_call:
            ok, new_state = model.step(state, ops[entry.index])
            config = (linearized | entry.bit, new_state)
            if ok and config not in seen:
                if len(seen) >= max_states:
                    order, st = deepest()
                    return VERDICT_UNKNOWN, order, st, len(seen)
                seen.add(config)
                stack.append((entry, state))
                linearized, state = config
                _lift(entry)
                remaining -= entry.match is not None
                entry = head.next
            else:
                entry = entry.next
        else:
            # The earliest pending completion: its op must be placed before anything later,
            # and no candidate before it works from here.
            best = deepest()
            if not stack:
                return VERDICT_FAIL, best[0], best[1], len(seen)
            top, state = stack.pop()
            linearized &= ~top.bit
            remaining += top.match is not None
            _unlift(top)
            entry = top.next
    return VERDICT_OK, tuple(e.index for e, _ in stack), state, len(seen)


def _frontier(ops: list[Operation], placed: set[int]) -> tuple[Operation | None, tuple[Operation, ...]]:
    """After the longest prefix: the ok op that had to come next by real time, and every
    unplaced op that was already invoked when it completed."""
    waiting = [op for i, op in enumerate(ops) if i not in placed and op.status == OK]
    if not waiting:
        return None, ()
    stuck = min(waiting, key=lambda op: (op.complete, op.invoke))
    pending = tuple(op for i, op in enumerate(ops) if i not in placed and op.invoke <= stuck.complete)
    return stuck, pending
