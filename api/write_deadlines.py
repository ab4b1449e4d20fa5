"""Write timeouts for a whole event loop: one pending timer, not one per write.

`asyncio.timeout` around each proposal cost a timer handle, a context manager and a
cancellation scope per write (~3% of a replica's event-loop CPU in `raftmesh bench
writes`). Writes on a replica share one timeout length, so their deadlines come in the
order the writes do: a FIFO with a single timer armed for its head serves them all.
"""
from __future__ import annotations

import asyncio
from collections import deque


class WriteDeadlines:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self._pending: deque[tuple[float, asyncio.Future]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, fut: asyncio.Future) -> asyncio.Future:
        """`fut`, failed with TimeoutError unless it is done within `seconds`."""
        loop, pending = fut.get_loop(), self._pending
        while pending and pending[0][1].done():
            pending.popleft()  # answered: writes mostly finish in the order they came
        pending.append((loop.time() + self.seconds, fut))
        if self._timer is None:
            self._timer = loop.call_at(pending[0][0], self._expire, loop)
        return fut

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer, pending, now = None, self._pending, loop.time()
        while pending and (pending[0][1].done() or pending[0][0] <= now):
            _, fut = pending.popleft()
            if not fut.done():
                fut.set_exception(TimeoutError())
        if pending:
            self._timer = loop.call_at(pending[0][0], self._expire, loop)

    def __len__(self) -> int:
        return len(self._pending)
