"""Client-observed histories for the linearizability checker, and their JSON-lines form.

A history records what clients saw, not what the cluster did. Outcomes follow Jepsen:
  ok      - took effect exactly once, somewhere between `invoke` and `complete`;
  fail    - definitely did not take effect (the checker drops it);
  unknown - may or may not have taken effect, at any time after `invoke` (a timeout, a
            dropped connection): its `complete`, if recorded, bounds nothing.
Times are monotonic seconds from one clock, so intervals from different clients compare.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable

OK, FAIL, UNKNOWN = "ok", "fail", "unknown"
STATUSES = frozenset({OK, FAIL, UNKNOWN})


@dataclass(frozen=True, kw_only=True)
class Operation:
    """One client call. `result` is what an ok call returned (the value seen, for reads)."""

    process: Any
    op_id: Any
    key: str
    f: str
    value: Any
    invoke: float
    complete: float | None
    status: str
    result: Any = None

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"op {self.op_id!r}: status {self.status!r} not in {sorted(STATUSES)}")
        if not isinstance(self.key, str):
            raise ValueError(f"op {self.op_id!r}: key must be a string, got {self.key!r}")
        if not _is_time(self.invoke):
            raise ValueError(f"op {self.op_id!r}: invoke must be a finite number, got {self.invoke!r}")
        if self.complete is not None:
            if not _is_time(self.complete):
                raise ValueError(f"op {self.op_id!r}: complete must be a finite number or None")
            if self.complete < self.invoke:
                raise ValueError(f"op {self.op_id!r}: completes ({self.complete}) before it is invoked ({self.invoke})")
        elif self.status == OK:
            raise ValueError(f"op {self.op_id!r}: an ok op must have a complete time")

    @property
    def deadline(self) -> float:
        """Latest time the op can take effect: an unknown op's completion is +infinity."""
        return math.inf if self.status == UNKNOWN else self.complete

    def describe(self) -> str:
        """One line for reports: who, what, seen what, when."""
        done = "never" if self.status == UNKNOWN else f"{self.complete:.6f}"
        seen = f" -> {self.result!r}" if self.status == OK else ""
        arg = "" if self.value is None else repr(self.value)
        return (f"p{self.process} #{self.op_id} {self.f}({arg}) {self.status}{seen}"
                f"  [{self.invoke:.6f}, {done}]")


def _is_time(t: Any) -> bool:
    return isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)


_FIELDS = tuple(f.name for f in fields(Operation))
_REQUIRED = frozenset(_FIELDS) - {"result"}


def to_dict(op: Operation) -> dict:
    return {name: getattr(op, name) for name in _FIELDS}


def from_dict(d: dict) -> Operation:
    """Build an Operation; extra keys (e.g. from other tools) are ignored, missing ones are an error."""
    missing = _REQUIRED - d.keys()
    if missing:
        raise ValueError(f"missing field(s) {sorted(missing)}")
    return Operation(**{name: d[name] for name in _FIELDS if name in d})


def dumps(history: Iterable[Operation]) -> str:
    """One JSON object per line. Tuples become lists (models compare them as equal)."""
    return "".join(json.dumps(to_dict(op), allow_nan=False, ensure_ascii=False) + "\n" for op in history)


def loads(text: str) -> list[Operation]:
    ops = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            ops.append(from_dict(d))
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"history line {n}: {e}") from e
    return ops


def save(history: Iterable[Operation], path: str | Path) -> None:
    Path(path).write_text(dumps(history), encoding="utf-8")


def load(path: str | Path) -> list[Operation]:
    return loads(Path(path).read_text(encoding="utf-8"))


def partition(history: Iterable[Operation]) -> dict[str, list[Operation]]:
    """Group by key, keeping history order: keys are independent objects, checked separately."""
    parts: dict[str, list[Operation]] = {}
    for op in history:
        parts.setdefault(op.key, []).append(op)
    return parts
