"""The replica process's garbage-collector policy around its netmap index.

The netmap feed (cluster/netmap_feed.py) is pure: it reports through its ChangeHooks when a
change begins and ends, how much it churned the index, how many deltas a batch made and how
large the index is; GcTuning decides from that when to pause, freeze and re-freeze the
collector. `raftmesh bench scale` (bench/scale.py) uses the same tuning, so what it
measures is what a replica does.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator

from raftmesh.cluster.netmap_feed import ChangeHooks

FREEZE_MIN_NODES = 1000  # indexes at least this large (when built or once grown to it)
#                          are moved out of the GC's reach
GC_GEN0_THRESHOLD = 20_000  # young-generation threshold once such an index exists
REFREEZE_EVERY = 200_000  # index changes plus the deltas they made, between re-freezes of a
#                           large index (see refreeze_gc)
FULL_REFREEZE_EVERY = 10  # every 10th freeze (a re-freeze or a large change's) unfreezes
#                            first, to reclaim cycles that died frozen
FREEZE_AFTER_DELTAS = 1000  # a change of a large index making this many deltas is frozen
#                             when it ends, not walked by the deferred young collection


class GcTuning(ChangeHooks):
    """The collector's treatment of one feed's index (a new feed, after a resync or a
    restart, starts over and freezes again)."""

    def __init__(self):
        self.large = False
        self._since_freeze = 0  # index changes and their deltas since the last (re-)freeze
        self._freezes = 0  # re-freezes and frozen changes, counted towards the next full one
        self._freeze_at_end = False

    @contextmanager
    def changing(self) -> Iterator[None]:
        self._freeze_at_end = False
        with collector_paused() as pause:
            try:
                yield
            finally:
                pause.freeze = self._freeze_at_end
                pause.full = self._freeze_at_end and self._full_due()

    def churned(self, units: int) -> None:
        self._since_freeze += units

    def batch_made(self, deltas: int) -> None:
        self._freeze_at_end = self.large and deltas >= FREEZE_AFTER_DELTAS

    def index_size(self, nodes: int) -> None:
        self._tune_once_large(nodes)
        if self.large and self._since_freeze >= REFREEZE_EVERY:
            refreeze_gc(full=self._full_due())
            self._since_freeze = 0

    def _full_due(self) -> bool:
        """Counts a freeze; True for every FULL_REFREEZE_EVERY-th. Every freeze also freezes
        the cyclic garbage other threads left uncollected (closed connections, ended
        streams); counting only the re-freezes let it pile up between the rare full ones
        (`raftmesh chaos soak`: a policy change to 1,000 agents every 30 s, re-freezes
        about hourly and a full one every tenth; 300 connections open during one change
        kept 815 KiB once closed). Counting every freeze bounds it to FULL_REFREEZE_EVERY
        freezes' worth."""
        self._freezes += 1
        return self._freezes % FULL_REFREEZE_EVERY == 0

    def _tune_once_large(self, nodes: int) -> None:
        """A cluster usually starts empty and grows: the index gets the GC treatment when it
        reaches FREEZE_MIN_NODES, not only when a replica starts with it that large (at
        10,000 nodes an untuned replica spent ~20% of its CPU in the collector, gen-2
        passes of ~0.27 s each, during `raftmesh bench propagation`)."""
        if not self.large and nodes >= FREEZE_MIN_NODES:
            self.large = True
            tune_gc_for_large_index()
            self._since_freeze = 0


def tune_gc_for_large_index() -> None:
    """Collect, then move every object alive now into the GC's permanent generation, and
    raise the young generation's threshold.

    A large index is ~50 tracked objects per node (records, views, roles, filter rules,
    ipaddress objects), half a million at 10,000 nodes: every full collection walked them
    all, 0.2-0.3 s on one core, stalling the change that happened to trigger it (that set
    the p99 of every kind of change in `raftmesh bench scale`). Frozen objects are still
    freed by reference counting when the index replaces them (its structures hold no
    cycles); only cyclic garbage among them would never be reclaimed. Objects created by
    later changes are collected as usual, so pauses would grow back as the index churns:
    GcTuning re-freezes every REFREEZE_EVERY changes (`refreeze_gc`), and a new feed
    (resync, restart) freezes again.

    One change allocates thousands of short-lived tracked objects (filter rules, deltas,
    sets); with the default threshold of 700 young collections ran dozens of times per
    change and took 20-30% of its CPU. At 20,000 most of them die (reference counting)
    before a collection sees them: in `raftmesh bench scale` at 10,000 nodes this cut total
    CPU per change by ~20% and the p99 by more. The threshold is process-wide and never
    lowered here; the cost is up to 20,000 young objects awaiting collection.
    """
    gc.collect()
    gc.freeze()
    raise_young_gc_threshold()


def raise_young_gc_threshold() -> None:
    """The young generation's threshold to at least GC_GEN0_THRESHOLD; never lowered.

    Replicas also raise it at start (api/server.py): each API write allocates a few hundred
    short-lived tracked objects, and at CPython's default of 700 a replica collected its
    young generation ~20 times a second under load; at 20,000 most of them are freed by
    reference counting first (+2.5% writes/s in `raftmesh bench writes`, three pairs)."""
    t0, t1, t2 = gc.get_threshold()
    if t0 < GC_GEN0_THRESHOLD:
        gc.set_threshold(GC_GEN0_THRESHOLD, t1, t2)


class _Pause:
    __slots__ = ("freeze", "full")

    def __init__(self):
        self.freeze = False
        self.full = False


@contextmanager
def collector_paused():
    """No automatic collection while the index changes or is built.

    A change allocates tens of thousands of tracked objects that live until it returns
    (the new filters and deltas, and the roles and sets it computes them from), so young
    collections ran several times within one change and walked them again each time, with
    a middle-generation pass every other change: ~25% of the CPU of a policy change at
    10,000 nodes. What a change leaves behind holds no cycles, so a collection during it
    finds nothing; the count goes on, and the first allocation after it triggers the
    collection it deferred. Process-wide, like the thresholds: for that time no other
    thread's garbage cycles are collected either, the same wait as a higher threshold.

    Setting `freeze` on the yielded object freezes instead of that deferred collection:
    after a change that rewrote thousands of nodes' filters and deltas, the walk of what it
    left behind was ~22% of the feed thread (py-spy, 10,000 agents), and a freeze is O(1).
    The objects are still freed by reference counting when replaced; cyclic garbage of
    other threads frozen with them waits for the next full re-freeze (`full` on the yielded
    object: refreeze_gc(full=True) instead of the freeze)."""
    pause = _Pause()
    if not gc.isenabled():  # off already: leave it as the caller set it
        yield pause
        return
    gc.disable()
    try:
        yield pause
    finally:
        if pause.full:
            refreeze_gc(full=True)
        elif pause.freeze:
            gc.freeze()
        gc.enable()


def refreeze_gc(full: bool = False) -> None:
    """Freeze again what was created since the last freeze (GcTuning: after
    REFREEZE_EVERY index changes plus deltas of a large index).

    Objects a change creates (new rules, filters, records, the history's deltas) are not
    frozen, so without this the index drifts back into the collector's reach: ~60 new
    long-lived objects per change at 10,000 nodes (`raftmesh bench scale`), and gen-2
    collections walking them grow back towards the 0.2-0.3 s of an unfrozen index. A
    re-freeze collects, then freezes: the collection walks only the *unfrozen* objects
    (tens of ms after ~1,000 node changes at 10,000 nodes, or 20 policy changes that each
    rewrite every filter), the walk an automatic full collection does anyway.

    The freeze is process-wide, so it also freezes whatever else is alive (streams,
    connections); those objects' cycles, once garbage, are only reclaimed after an
    unfreeze. `full` unfreezes first (one walk of everything, ~0.3 s at 10,000 nodes), so
    such garbage lives at most FULL_REFREEZE_EVERY freezes (GcTuning._full_due).
    """
    if full:
        gc.unfreeze()
    gc.collect()
    gc.freeze()
