"""A Raft thread that stops ticking is reported, with where it stands.

A slow tick is logged when it ends (RaftReplica._note_slow_tick); a tick that never ends
logged nothing. Chaos campaign seed 24: a replica restarted after SIGKILL stayed at its old
term for the 45 s the check waited, hearing from nobody, with nothing in its log to say
why. This watch logs the Raft thread's stack once it has not finished a tick for `limit`
seconds, and again when it ticks again.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from typing import Callable

from .pause import pause

log = logging.getLogger("raftmesh.replica")
STALL_SECONDS = 5.0


class StallWatch:
    def __init__(self, name: str, watched: threading.Thread, last_tick: Callable[[], float],
                 stopping: Callable[[], bool], limit: float = STALL_SECONDS):
        self.name, self.watched, self.last_tick, self.stopping = name, watched, last_tick, stopping
        self.limit = limit
        self.stalled_since: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"stall-watch-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def check(self, now: float) -> str | None:
        """What to log at `now`, if anything (sans-I/O: the caller passes the time)."""
        since = self.last_tick()
        if now - since > self.limit and self.stalled_since != since:
            self.stalled_since = since
            return (f"replica {self.name}: raft thread has not finished a tick for "
                    f"{now - since:.1f} s; it is at:\n{self.stack()}")
        if self.stalled_since is not None and since != self.stalled_since:
            self.stalled_since = None
            return f"replica {self.name}: raft thread ticks again"
        return None

    def stack(self) -> str:
        frame = sys._current_frames().get(self.watched.ident)
        return "".join(traceback.format_stack(frame)) if frame is not None else "(not running)"

    def _run(self) -> None:
        while not self.stopping() and self.watched.is_alive():
            message = self.check(time.monotonic())
            if message is not None:
                log.warning("%s", message)
            pause(self.limit / 4)
