"""Pauses of the replica's own threads that also work under libfaketime.

`time.sleep` raises EINVAL in a process started under libfaketime with its monotonic clock
left alone (the chaos `clock` fault, chaos/clock.py), which killed the Raft stall watch in
every such replica, and would have killed the Raft thread in its retry paths. A wait on a
condition variable keeps the same timing and works there.
"""
from __future__ import annotations

import threading

_NEVER_SET = threading.Event()


def pause(seconds: float) -> None:
    """Wait `seconds` (a period or a retry delay, never synchronisation)."""
    _NEVER_SET.wait(seconds)
