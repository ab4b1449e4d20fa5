"""When commits travel: what a replica may hold back, and for how long (sans-I/O: callers
pass the time).

Sent the moment it moves, a leader's commit index costs every write a message of its own:
two more AppendEntries, two acks, and a tick on every replica, each follower applying the
write while the leader is still answering it. At one client that put ~150 us of sends
between the commit and the answer and kept all three replicas busy on two cores (traced,
docs/benchmarks.md). So a leader holds a commit index that no follower waits on until the
next entries carry it, for at most a short delay, and a follower with nobody waiting
applies what it learned at most that delay later, in one batch. A follower whose own client
waits (it forwarded the command or a read barrier) is told and applies at once, and so does
one that learns a commit index from a message without entries: the leader held it already,
writes have paused, and there is nothing to batch.
"""
from __future__ import annotations

from collections import deque
from typing import Hashable

# How long a commit index, or a follower's apply, may be held. Short against what anyone
# watching a follower notices (an agent's netmap, a revoke, a stale read), long against the
# gap between a commit and the next entries at one client (~0.7 ms), so they nearly always
# carry it.
HOLD_SECONDS = 0.002


class Hold:
    """Work held back until `delay` after the first of it was held."""

    def __init__(self, delay: float = HOLD_SECONDS):
        self.delay = delay
        self.since: float | None = None

    def due(self, now: float) -> bool:
        """Whether held work must go now; starts the hold if nothing was held."""
        if self.since is None:
            self.since = now
        return now - self.since >= self.delay

    def release(self) -> None:
        self.since = None

    def expire(self) -> None:
        """Make what is held due now (until released)."""
        self.since = float("-inf")

    def remaining(self, now: float) -> float | None:
        """Seconds until the held work is due, or None when nothing is held."""
        return None if self.since is None else max(0.0, self.since + self.delay - now)


class ForwardedCommands:
    """On a leader: entries that followers proposed, whose clients wait for the commit."""

    def __init__(self):
        self._waiting: deque[tuple[int, Hashable]] = deque()  # (index, node), in log order

    def add(self, index: int, node: Hashable) -> None:
        self._waiting.append((index, node))

    def committed(self, commit_index: int) -> set:
        """The followers waiting on an entry up to `commit_index`; forgets those entries."""
        nodes = set()
        while self._waiting and self._waiting[0][0] <= commit_index:
            nodes.add(self._waiting.popleft()[1])
        return nodes

    def clear(self) -> None:
        self._waiting.clear()

    def __len__(self) -> int:
        return len(self._waiting)
