"""From applied commands to per-node netmap deltas, with the history that lets agents resume.

Every replica feeds the same committed commands, in log order, into its own NetmapFeed, so
every replica derives the same netmaps at the same state version (time comes from the
replicated clock, the commands' own times, never from the local wall clock). That is what
makes a version meaningful across replicas: an agent that held version V on one replica
resumes on another with only what changed after V.

Pure: no clock, no I/O. The edge (api/map_stream.py) turns updates into signed frames.
"""
from __future__ import annotations

import bisect
import gc
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable

from raftmesh.proto.wire import Netmap, NetmapDelta, compose_deltas
from raftmesh.cluster.commands import Command
from raftmesh.cluster.netmap import Changes, NetmapIndex
from raftmesh.cluster.policy import Policy
from raftmesh.cluster.policy_form import UnreadablePolicy, stored_policy

HISTORY_PER_NODE = 32  # deltas kept per node; an agent further behind gets a full netmap
FREEZE_MIN_NODES = 1000  # indexes at least this large (when built or once grown to it)
#                          are moved out of the GC's reach
GC_GEN0_THRESHOLD = 20_000  # young-generation threshold once such an index exists
REFREEZE_EVERY = 200_000  # index changes plus the deltas they made, between re-freezes of a
#                           large index (see refreeze_gc)
FULL_REFREEZE_EVERY = 10  # every 10th re-freeze unfreezes first, to reclaim frozen cycles
FREEZE_AFTER_DELTAS = 1000  # a change of a large index making this many deltas is frozen
#                             when it ends, not walked by the deferred young collection
# Commands whose result value is the node's whole new record.
NODE_RECORD_OPS = frozenset({"node.register", "node.update", "node.approve", "node.expire",
                             "node.routes", "node.report", "node.rotate_key",
                             "node.reauthenticate"})
# Every command a netmap is derived from (see NetmapFeed._changes), and the cluster-key
# commands the hub re-reads its signer for.
NETMAP_OPS = NODE_RECORD_OPS | {"node.delete", "node.presence", "node.presence_sweep",
                                "member.remove", "policy.set"}


@dataclass
class FeedUpdate:
    """What one applied batch changed: a composed delta per affected node (stamped with
    the batch's last version), the nodes that left the mesh (close their streams) and, per
    node, the earliest command time behind its delta (for propagation metrics)."""

    version: int
    deltas: dict[str, NetmapDelta] = field(default_factory=dict)
    gone: frozenset[str] = frozenset()
    cause_time: dict[str, float] = field(default_factory=dict)
    keys_changed: bool = False


@dataclass
class _History:
    floor: int  # every change to this node after `floor` is in `entries`
    entries: list[tuple[int, NetmapDelta]] = field(default_factory=list)


class NetmapFeed:
    """`policy` is the stored policy record in force (None: no policy yet, deny all).

    A policy this replica cannot interpret (cluster/policy_form.py) never turns into another
    one: the feed keeps the netmaps of the last policy it could read (a policy.set it cannot
    read makes no deltas) and `policy_problem` says why, which makes the replica not ready.
    A feed built from such a policy has no netmaps to serve at all (`serving` is False)
    until a readable policy arrives."""

    def __init__(self, policy: dict | None, nodes: Iterable[dict], clock: float,
                 version: int, history_per_node: int = HISTORY_PER_NODE):
        self.version = version
        self.floor = version  # nothing before this is in any history
        self.policy_problem: str | None = None
        readable = self._interpret(policy, policy and policy.get("version"), version)
        self.serving = policy is None or readable is not None
        with collector_paused():
            self.index = NetmapIndex(readable, nodes, clock)
        self._large = False
        self._since_freeze = 0  # index changes and their deltas since the last (re-)freeze
        self._tune_gc_once_large()
        self._refreezes = 0
        self.history_per_node = history_per_node
        self._history: dict[str, _History] = {}

    @property
    def clock(self) -> float:
        return self.index.now

    def full(self, node_id: str) -> Netmap | None:
        return self.index.netmap(node_id, self.version)

    def next_expiry(self) -> float | None:
        return self.index.next_expiry()

    # -- applying ------------------------------------------------------------------------
    def apply_batch(self, items: Iterable[tuple[int, Command, dict]]) -> FeedUpdate:
        """Apply committed (version, command, result) items in log order; items at or below
        the feed's version are skipped (they are already in the state it was built from)."""
        deltas: dict[str, NetmapDelta] = {}
        cause: dict[str, float] = {}
        gone: set[str] = set()
        keys_changed = False
        version = self.version
        with collector_paused() as pause:
            for v, cmd, result in items:
                if v <= self.version:
                    continue
                version = v
                if not result.get("ok") or result.get("replayed"):
                    continue  # changed nothing (and did not move the replicated clock)
                keys_changed |= cmd.op.startswith("clusterkey.")
                for changes in self._changes(v, cmd, result):
                    self._since_freeze += 1 + len(changes.deltas)
                    gone.update(changes.gone)
                    for k, d in changes.deltas.items():
                        deltas[k] = compose_deltas(deltas[k], d) if k in deltas else d
                        cause.setdefault(k, cmd.time)
            if version == self.version:
                return FeedUpdate(version)
            self.version = version
            stamped = {k: _restamp(d, version) for k, d in deltas.items()}
            self._record(stamped, gone)
            pause.freeze = self._large and len(stamped) >= FREEZE_AFTER_DELTAS
        self._tune_gc_once_large()
        if self._large and self._since_freeze >= REFREEZE_EVERY:
            self._refreezes += 1
            refreeze_gc(full=self._refreezes % FULL_REFREEZE_EVERY == 0)
            self._since_freeze = 0
        return FeedUpdate(version, stamped, frozenset(gone), cause, keys_changed)

    def _tune_gc_once_large(self) -> None:
        """A cluster usually starts empty and grows: the index gets the GC treatment when it
        reaches FREEZE_MIN_NODES, not only when a replica starts with it that large (at
        10,000 nodes an untuned replica spent ~20% of its CPU in the collector, gen-2
        passes of ~0.27 s each, during `raftmesh bench propagation`)."""
        if not self._large and self.index.visible_count() >= FREEZE_MIN_NODES:
            self._large = True
            tune_gc_for_large_index()
            self._since_freeze = 0

    def apply_if_only_time(self, items: Iterable[tuple[int, Command, dict]]) -> bool:
        """apply_batch for a batch that can change no netmap and no key, in one cheap pass
        (the bulk of admin writes: users, keys, audit), cheap enough for any thread.

        Such a batch has no command netmaps are derived from and no time reaching a key
        expiry, so it only moves the feed's version and clock. Returns False, having
        changed nothing, for any other batch: that one needs apply_batch."""
        nxt = self.index.next_expiry()
        version, now = self.version, self.index.now
        for v, cmd, result in items:
            if cmd.op in NETMAP_OPS or cmd.op.startswith("clusterkey.") or \
                    (nxt is not None and cmd.time >= nxt):
                return False
            if v > version:
                version = v
                if cmd.time > now and result.get("ok") and not result.get("replayed"):
                    now = cmd.time
        if version != self.version:
            self.index.advance_time(now, version)  # crosses no expiry: no changes
            self.version = version
        return True

    def _changes(self, v: int, cmd: Command, result: dict) -> list[Changes]:
        out = []
        if cmd.time > self.index.now:
            out.append(self.index.advance_time(cmd.time, v))
        value = result.get("value")
        if cmd.op == "node.delete":
            out.append(self.index.remove_node(cmd.args["id"], v))
        elif cmd.op in ("node.presence", "node.presence_sweep", "member.remove"):
            out.extend(self.index.upsert_node(n, v) for n in value["nodes"])
        elif cmd.op in NODE_RECORD_OPS:
            out.append(self.index.upsert_node(value, v))
        elif cmd.op == "policy.set":
            policy = self._interpret(cmd.args, (value or {}).get("version"), v)
            if policy is not None:
                out.append(self.index.replace_policy(policy, v))
                self.serving = True
        return out

    def _interpret(self, stored: dict | None, policy_version: int | None,
                   state_version: int) -> Policy | None:
        """The policy `stored` holds (None for no policy), or None with policy_problem set."""
        if stored is None:
            return None
        try:
            policy = stored_policy(stored)
        except UnreadablePolicy as e:
            self.policy_problem = (f"cannot interpret policy version {policy_version} (state "
                                   f"version {state_version}): {e}")
            return None
        self.policy_problem = None
        return policy

    def _record(self, deltas: dict[str, NetmapDelta], gone: set[str]) -> None:
        for k in gone:  # an agent that left and comes back starts from a full netmap
            self._history[k] = _History(self.version)
        for k, d in deltas.items():
            if k in gone:
                continue
            h = self._history.setdefault(k, _History(self.floor))
            h.entries.append((self.version, d))
            if len(h.entries) > self.history_per_node:
                h.floor = h.entries.pop(0)[0]
        for k in [k for k in gone if not self.index.knows(k)]:  # deleted for good
            self._history.pop(k, None)

    # -- resuming ------------------------------------------------------------------------
    def resume(self, node_id: str, since: int | None) -> Netmap | NetmapDelta | None:
        """What an agent holding version `since` needs: a delta with everything after it,
        or a full netmap when `since` is unknown, too old, or ahead of this feed (the
        caller waits for the feed to catch up first). None when the node is not visible."""
        if not self.index.is_visible(node_id):
            return None
        h = self._history.get(node_id, _History(self.floor))
        if since is None or since < h.floor or since > self.version:
            return self.full(node_id)
        i = bisect.bisect_right(h.entries, since, key=lambda e: e[0])
        out = NetmapDelta(self.version)
        for _, d in h.entries[i:]:
            out = compose_deltas(out, d)
        return _restamp(out, self.version)


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
    the feed re-freezes every REFREEZE_EVERY changes (`refreeze_gc`), and a new feed
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
    __slots__ = ("freeze",)

    def __init__(self):
        self.freeze = False


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
    other threads frozen with them waits for the next full re-freeze (refreeze_gc)."""
    pause = _Pause()
    if not gc.isenabled():  # off already: leave it as the caller set it
        yield pause
        return
    gc.disable()
    try:
        yield pause
    finally:
        if pause.freeze:
            gc.freeze()
        gc.enable()


def refreeze_gc(full: bool = False) -> None:
    """Freeze again what was created since the last freeze (NetmapFeed: after
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
    such garbage lives at most FULL_REFREEZE_EVERY re-freezes.
    """
    if full:
        gc.unfreeze()
    gc.collect()
    gc.freeze()


def _restamp(d: NetmapDelta, version: int) -> NetmapDelta:
    if d.version == version:
        return d
    return NetmapDelta(version, d.peers_changed, d.peers_removed, d.packet_filter, d.self_node)
