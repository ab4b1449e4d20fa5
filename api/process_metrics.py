"""Process metrics for /metrics: CPU, memory, file descriptors and the garbage collector.

The collector deserves its own numbers: at 10,000 nodes an untuned replica spent a fifth of
its CPU in it, in gen-2 passes of ~0.27 s that stall the event loop (docs/netmap-complexity.md),
and nothing an operator could see said so. prometheus_client counts collections; the time
they take comes from `gc.callbacks`, timed on the thread that triggered each one.
"""
from __future__ import annotations

import gc
import time

from prometheus_client import GCCollector, Histogram, ProcessCollector

PAUSE_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1)


class GcPauses:
    """raftmesh_gc_pause_seconds by generation, fed by a gc callback until `close()`."""

    def __init__(self, registry):
        self.histogram = Histogram("raftmesh_gc_pause_seconds",
                                   "time in each garbage collection, by generation",
                                   ["generation"], registry=registry, buckets=PAUSE_BUCKETS)
        self._by_generation = [self.histogram.labels(str(g)) for g in range(3)]
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        # Collections never overlap (the GIL, and gc is not re-entrant): one start time will do.
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started:
            self._by_generation[info["generation"]].observe(time.perf_counter() - self._started)

    def close(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)


def register(registry) -> GcPauses:
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, resident memory, fds
    GCCollector(registry=registry)  # python_gc_collections_total and objects collected
    return GcPauses(registry)
