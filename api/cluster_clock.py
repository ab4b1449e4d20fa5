"""This replica's wall clock compared with the cluster's, from the commands it applies.

Every command carries its proposer's wall clock (`Command.time`), and writes come in
through every replica, so the median of (command time - local time at apply) over recent
commands proposed by other replicas is this replica's offset from the others when its own
clock is the wrong one. Its own commands say nothing (they carry its own clock) and are left
out: counted, they outvoted the others whenever it proposed half of the recent writes (a
leader with a clock a day off, one replica down: chaos campaign seed 23 got 401s).
Used to tell "the agent's clock is off" (401: fix the agent) from "this replica's clock is
off" (503: try another replica), which a replica cannot tell from its own clock alone:
a replica whose clock jumped a day rejected every correctly signed registration with 401
(chaos `clock` fault), which an agent takes as a permanent refusal. A step of the local
wall clock (seen against the monotonic clock) shifts the recorded offsets with it, so a
jump is known at once, not only after a handful of new commands.
"""
from __future__ import annotations

import statistics
import threading
import time
from collections import deque

from aiohttp import web

from raftmesh.cluster.raft import Raft

SAMPLES = 16  # recent commands
MIN_SAMPLES = 8  # fewer say nothing: a quiet cluster gives no estimate
WARMUP = 10.0  # seconds after the start in which fewer samples mean "not yet", not "quiet"
STEP = 1.0  # seconds: a larger change of wall - monotonic is a step of the wall clock
OWN_LIMIT = 4096  # own proposals remembered until they apply


class ClusterClock:
    def __init__(self, replica: Raft):
        self._deltas: deque[float] = deque(maxlen=SAMPLES)
        self._base = time.time() - time.monotonic()
        self._lock = threading.Lock()  # applies come on the Raft thread, lookups on the loop
        self._own: dict[float, None] = {}  # times of this replica's proposals not yet applied
        self._started = time.monotonic()
        replica.add_apply_listener(self._on_batch)
        replica.add_propose_listener(self._on_propose)

    def _on_propose(self, cmd) -> None:
        if cmd.time:
            with self._lock:
                self._own[cmd.time] = None
                while len(self._own) > OWN_LIMIT:  # ones that never applied (failed proposals)
                    del self._own[next(iter(self._own))]

    def _now(self) -> float:
        """The wall clock, after shifting the recorded offsets by any step it took since."""
        now = time.time()
        step = now - time.monotonic() - self._base
        if abs(step) > STEP:
            self._deltas = deque((d - step for d in self._deltas), maxlen=SAMPLES)
            self._base += step
        return now

    def _on_batch(self, batch: list) -> None:
        with self._lock:
            now = self._now()
            for _, cmd, _ in batch:
                if not cmd.time:  # barriers and internal commands carry no time
                    continue
                if cmd.time in self._own:
                    del self._own[cmd.time]
                    continue
                self._deltas.append(cmd.time - now)

    def offset(self) -> float | None:
        """Seconds this replica's clock is behind (-) or ahead (+) of the proposers' clocks,
        or None without enough recent commands."""
        with self._lock:
            self._now()
            deltas = list(self._deltas)
        return -statistics.median_low(deltas) if len(deltas) >= MIN_SAMPLES else None

    def warming_up(self, now: float | None = None) -> bool:
        """Whether no estimate may only mean "just started": campaign run 72, a replica
        restarted with its clock 3 h behind was ready 0.5 s later, before 8 of the others'
        commands had applied, and told a correctly signed agent to check its clock (401)."""
        return (time.monotonic() if now is None else now) - self._started < WARMUP


CLUSTER_CLOCK = web.AppKey("cluster_clock", ClusterClock)
