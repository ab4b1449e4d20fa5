"""Process metrics for /metrics: CPU (also by thread), memory, file descriptors and the
garbage collector.

The collector deserves its own numbers: at 10,000 nodes an untuned replica spent a fifth of
its CPU in it, in gen-2 passes of ~0.27 s that stall the event loop (docs/netmap-complexity.md),
and nothing an operator could see said so. prometheus_client counts collections; the time
they take comes from `gc.callbacks`, timed on the thread that triggered each one.

CPU by thread says which part of a replica is busy: the event loop (API, agent streams),
the Raft thread, the netmap feed (policy and node changes into deltas) or the snapshot
writer. Finding that the feed thread, not frame signing, was the largest share of a 10,000-
agent policy change took an ad-hoc probe of /proc before.
"""
from __future__ import annotations

import gc
import os
import threading
import time

from prometheus_client import GCCollector, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily

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


# Thread name prefixes (as the replica names its threads) -> the `thread` label.
THREAD_ROLES = (("raft-", "raft"), ("netmap-feed", "netmap-feed"), ("snapshot", "snapshot"),
                ("lmdb-writeback", "lmdb-writeback"), ("policy", "policy"))


def thread_role(thread: threading.Thread) -> str:
    if thread is threading.main_thread():
        return "event-loop"  # the server runs its loop on the main thread (api/server.py)
    return next((role for prefix, role in THREAD_ROLES if thread.name.startswith(prefix)),
                "other")


class ThreadCpuCollector:
    """raftmesh_thread_cpu_seconds_total{thread=event-loop|raft|netmap-feed|snapshot|
    lmdb-writeback|other}, read from /proc/self/task at scrape time (nothing on systems
    without it). A role's count drops when one of its threads ends, which Prometheus reads
    as a counter reset; the named roles live as long as the replica."""

    def collect(self):
        roles = {t.native_id: thread_role(t) for t in threading.enumerate()}
        seconds = dict.fromkeys(("event-loop", *(role for _, role in THREAD_ROLES), "other"), 0.0)
        try:
            tids = os.listdir("/proc/self/task")
        except OSError:
            return
        tick = os.sysconf("SC_CLK_TCK")
        for tid in tids:
            try:
                with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue  # the thread ended meanwhile
            seconds[roles.get(int(tid), "other")] += (int(fields[11]) + int(fields[12])) / tick
        c = CounterMetricFamily("raftmesh_thread_cpu_seconds", "CPU time of this replica's "
                                "threads, by what they do", labels=["thread"])
        for role, value in seconds.items():
            c.add_metric([role], value)
        yield c


def register(registry) -> GcPauses:
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, resident memory, fds
    GCCollector(registry=registry)  # python_gc_collections_total and objects collected
    registry.register(ThreadCpuCollector())
    return GcPauses(registry)
