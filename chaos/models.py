"""Sequential specifications of the admin-API objects, for the linearizability checker.

A model is a pure state machine: `init()` gives the initial state and `step(state, op)`
returns (ok, new_state), where ok says whether `op`, applied in `state`, could have returned
what it was seen to return. States must be hashable because the checker memoises them.
An op whose status is "unknown" was never observed, so its result is not checked; applying
it still changes the state (if the checker linearizes it, it happened).
"""
from __future__ import annotations

from typing import Any, Hashable

from .history import UNKNOWN, Operation


def freeze(value: Any) -> Hashable:
    """Hashable, order-preserving form of a JSON-ish value: lists and tuples compare equal,
    so a history read back from JSON checks the same as the one written."""
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    if isinstance(value, dict):
        return ("__dict__", frozenset((k, freeze(v)) for k, v in value.items()))
    if isinstance(value, (set, frozenset)):
        return frozenset(freeze(v) for v in value)
    return value


def observed(op: Operation, expected: Any) -> bool:
    """Did `op` return `expected`? Always true for unknown ops: nobody saw their result."""
    return op.status == UNKNOWN or freeze(op.result) == expected


class Model:
    """Base class. `read_only` names ops that never change state: the checker drops unknown
    ones (they constrain nothing) to keep the search small."""

    name = "model"
    read_only: frozenset[str] = frozenset({"read"})

    def init(self) -> Hashable:
        raise NotImplementedError

    def step(self, state: Hashable, op: Operation) -> tuple[bool, Hashable]:
        raise NotImplementedError

    def _unsupported(self, op: Operation):
        # A workload/model mismatch is a bug in the test, not a linearizability violation.
        return ValueError(f"{self.name}: unsupported operation {op.f!r} (op {op.op_id!r}, key {op.key!r})")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RegisterModel(Model):
    """A single value, initially None: read, write, and cas(value=[old, new]) -> True/False."""

    name = "register"

    def init(self):
        return None

    def step(self, state, op):
        if op.f == "read":
            return observed(op, state), state
        if op.f == "write":
            return True, freeze(op.value)
        if op.f == "cas":
            old, new = op.value
            if state == freeze(old):
                return observed(op, True), freeze(new)
            return observed(op, False), state
        raise self._unsupported(op)


class ExistenceModel(Model):
    """A named object that exists or not. The API answers a duplicate create with 409, which
    the workload records as ok with result "exists", so create/delete are total operations."""

    name = "existence"

    def init(self):
        return False

    def step(self, present, op):
        if op.f == "read":
            return observed(op, present), present
        if op.f == "create":
            return observed(op, "exists" if present else "created"), True
        if op.f == "delete":
            return observed(op, "deleted" if present else "absent"), False
        raise self._unsupported(op)


class CounterModel(Model):
    """An integer from 0: add(value, default 1) and read."""

    name = "counter"

    def init(self):
        return 0

    def step(self, n, op):
        if op.f == "read":
            return observed(op, n), n
        if op.f == "add":
            return True, n + (1 if op.value is None else op.value)
        raise self._unsupported(op)


class SetModel(Model):
    """A grow-only set: add(value) and read -> all members (any order)."""

    name = "set"

    def init(self):
        return frozenset()

    def step(self, members, op):
        if op.f == "read":
            if op.status == UNKNOWN:
                return True, members
            seen = op.result if isinstance(op.result, (list, tuple, set, frozenset)) else None
            return seen is not None and frozenset(freeze(v) for v in seen) == members, members
        if op.f == "add":
            return True, members | {freeze(op.value)}
        raise self._unsupported(op)
