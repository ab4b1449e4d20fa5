"""Typed, versioned command records: what travels through the Raft log.

A command is canonical JSON bytes, never a pickled object of ours, so any replica version
can read it and nothing executable crosses the wire. Everything non-deterministic (time,
IDs, generated secrets) is decided by the proposer and carried in the record.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raftmesh.storage.json_codec import compact_json, loads_utf8

FORMAT_VERSION = 1
_encode = compact_json(sort_keys=True)


class CommandError(ValueError):
    """A record that is not a valid command (never produced by a correct proposer)."""


@dataclass(frozen=True)
class Command:
    op: str
    args: dict[str, Any] = field(default_factory=dict)
    time: float = 0.0  # proposer's wall clock, unix seconds
    actor: str = "system"  # "apikey:<id>", "node:<id>", "replica:<id>" or "system"
    request_id: str | None = None  # idempotency key: replays return the first result

    def encode(self) -> bytes:
        record = {"v": FORMAT_VERSION, "op": self.op, "args": self.args,
                  "time": self.time, "actor": self.actor}
        if self.request_id is not None:
            record["request_id"] = self.request_id
        return _encode(record).encode()

    @classmethod
    def decode(cls, data: bytes) -> "Command":
        try:
            record = loads_utf8(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise CommandError(f"not JSON: {e}") from None
        if not isinstance(record, dict) or record.get("v") != FORMAT_VERSION:
            raise CommandError(f"unsupported command format {record.get('v') if isinstance(record, dict) else None!r}")
        op, args = record.get("op"), record.get("args", {})
        if not isinstance(op, str) or not isinstance(args, dict):
            raise CommandError("command needs a string op and an object args")
        time = record.get("time", 0.0)
        if not isinstance(time, (int, float)):
            raise CommandError("command time must be a number")
        return cls(op, args, float(time), str(record.get("actor", "system")),
                   record.get("request_id"))
