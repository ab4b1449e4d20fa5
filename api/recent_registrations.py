"""Machines that registered through this replica a moment ago, with the version of that write.

A new node opens its map stream a few milliseconds after its registration is answered,
nearly always on the replica that answered it. That replica has applied the registration,
so it can serve the node's first netmap from its own state instead of first catching up
with the leader through a read barrier (3-19 ms of the new node's path to its first packet
on a loaded machine; agent_api._caught_up). Remembered once per registration, for a few
seconds, in this process only: nothing about it is replicated or persisted. Sans-I/O: the
caller passes the time.
"""
from __future__ import annotations

from collections import OrderedDict

from aiohttp import web

REMEMBER_SECONDS = 10.0
MAX_REMEMBERED = 100_000  # 10 s of registrations at 10,000 a second


class RecentRegistrations:
    def __init__(self, seconds: float = REMEMBER_SECONDS, limit: int = MAX_REMEMBERED):
        self.seconds, self.limit = seconds, limit
        self._by_machine: OrderedDict[str, tuple[int, float]] = OrderedDict()  # oldest first

    def add(self, machine: str, version: int, now: float) -> None:
        self._by_machine.pop(machine, None)
        self._by_machine[machine] = (version, now)
        self._forget_old(now)

    def take(self, machine: str, now: float) -> int | None:
        """The version of `machine`'s registration here, if recent; forgotten once taken
        (a later stream of the node is not its first)."""
        self._forget_old(now)
        entry = self._by_machine.pop(machine, None)
        return None if entry is None else entry[0]

    def __len__(self) -> int:
        return len(self._by_machine)

    def _forget_old(self, now: float) -> None:
        entries = self._by_machine
        while entries and (len(entries) > self.limit or
                           next(iter(entries.values()))[1] < now - self.seconds):
            entries.popitem(last=False)


RECENT_REGISTRATIONS = web.AppKey("recent_registrations", RecentRegistrations)
