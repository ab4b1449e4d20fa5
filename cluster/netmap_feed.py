"""From applied commands to per-node netmap deltas, with the history that lets agents resume.

Every replica feeds the same committed commands, in log order, into its own NetmapFeed, so
every replica derives the same netmaps at the same state version (time comes from the
replicated clock, the commands' own times, never from the local wall clock). That is what
makes a version meaningful across replicas: an agent that held version V on one replica
resumes on another with only what changed after V.

Pure: no clock, no I/O. The edge (api/map_stream.py) turns updates into signed frames, and
the process hosting the feed tunes itself around its changes through ChangeHooks
(api/gc_tuning.py: the garbage collector).
"""
from __future__ import annotations

import bisect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from raftmesh.proto.wire import Netmap, NetmapDelta, compose_deltas
from raftmesh.cluster.commands import Command, DnsSet, NodeDelete, NodeRegister, NodeRemoveEphemeral, PolicySet
from raftmesh.cluster.netmap import Changes, NetmapIndex
from raftmesh.cluster.policy import Policy
from raftmesh.cluster.policy_form import UnreadablePolicy, stored_policy

HISTORY_PER_NODE = 32  # deltas kept per node; an agent further behind gets a full netmap


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


class ChangeHooks:
    """What the process hosting a feed may do around its index's changes; the feed only
    reports them (the replica's garbage-collector policy is api/gc_tuning.py). These do
    nothing."""

    @contextmanager
    def changing(self) -> Iterator[None]:
        """Around building the index, and around applying each batch."""
        yield

    def churned(self, units: int) -> None:
        """One index change: `units` is 1 plus the deltas it made."""

    def batch_made(self, deltas: int) -> None:
        """Last thing inside `changing`, for a batch that changed something: its deltas."""

    def index_size(self, nodes: int) -> None:
        """After the index was built or a batch was applied: how many nodes it has now."""


class NetmapFeed:
    """`policy` is the stored policy record in force (None: no policy yet, deny all).

    A policy this replica cannot interpret (cluster/policy_form.py) never turns into another
    one: the feed keeps the netmaps of the last policy it could read (a policy.set it cannot
    read makes no deltas) and `policy_problem` says why, which makes the replica not ready.
    A feed built from such a policy has no netmaps to serve at all (`serving` is False)
    until a readable policy arrives.

    With `watch_all` False, only the nodes the caller `watch`es (those streaming from this
    replica) get their filters in deltas; the others' netmaps are derived when asked
    (`full`, `resume`). See NetmapIndex.watch."""

    def __init__(self, policy: dict | None, nodes: Iterable[dict], clock: float,
                 version: int, history_per_node: int = HISTORY_PER_NODE,
                 hooks: ChangeHooks | None = None, dns: dict | None = None,
                 watch_all: bool = True):
        self.version = version
        self.floor = version  # nothing before this is in any history
        self.hooks = hooks or ChangeHooks()
        self.policy_problem: str | None = None
        readable = self._interpret(policy, policy and policy.get("version"), version)
        self.serving = policy is None or readable is not None
        with self.hooks.changing():
            self.index = NetmapIndex(readable, nodes, clock, dns, watch_all)
        self.hooks.index_size(self.index.visible_count())
        self.history_per_node = history_per_node
        self._history: dict[str, _History] = {}

    @property
    def clock(self) -> float:
        return self.index.now

    def full(self, node_id: str) -> Netmap | None:
        return self.index.netmap(node_id, self.version)

    def watch(self, node_id: str) -> None:
        """A stream of `node_id` is served from here: derive its deltas whole from now on."""
        self.index.watch(node_id, self.version)

    def unwatch(self, node_id: str) -> None:
        """Its last stream here closed."""
        self.index.unwatch(node_id, self.version)

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
        items = [it for it in items if it[0] > self.version]
        with self.hooks.changing():
            i = 0
            while i < len(items):
                v, cmd, result = items[i]
                i += 1
                version = v
                if not _took_effect(result):
                    continue  # changed nothing (and did not move the replicated clock)
                keys_changed |= cmd.changes_cluster_keys
                run = [items[i - 1]]
                if isinstance(cmd, NodeRegister):
                    # No key expiry may fall within the run: a node that expired between two
                    # of its registrations was in a netmap another replica, batching them
                    # differently, may have served at a version inside the run.
                    horizon = min(self.index.next_expiry(after=cmd.time) or INF, _expiry(result))
                    while i < len(items) and isinstance(items[i][1], NodeRegister) and \
                            _took_effect(items[i][2]) and items[i][1].time < horizon:
                        run.append(items[i])
                        version = items[i][0]
                        horizon = min(horizon, _expiry(items[i][2]))
                        i += 1
                found = self._changes(v, cmd, result) if len(run) == 1 else \
                    self._registrations(run)
                for changes in found:
                    self.hooks.churned(1 + len(changes.deltas))
                    gone.update(changes.gone)
                    for k, d in changes.deltas.items():
                        deltas[k] = compose_deltas(deltas[k], d) if k in deltas else d
                        cause.setdefault(k, cmd.time)
            if version == self.version:
                return FeedUpdate(version)
            self.version = version
            stamped = {k: _restamp(d, version) for k, d in deltas.items()}
            self._record(stamped, gone)
            self.hooks.batch_made(len(stamped))
        self.hooks.index_size(self.index.visible_count())
        return FeedUpdate(version, stamped, frozenset(gone), cause, keys_changed)

    def apply_if_only_time(self, items: Iterable[tuple[int, Command, dict]]) -> bool:
        """apply_batch for a batch that can change no netmap and no key, in one cheap pass
        (the bulk of admin writes: users, keys, audit), cheap enough for any thread.

        Such a batch has no command netmaps are derived from and no time reaching a key
        expiry, so it only moves the feed's version and clock. Returns False, having
        changed nothing, for any other batch: that one needs apply_batch."""
        nxt = self.index.next_expiry()
        version, now = self.version, self.index.now
        for v, cmd, result in items:
            if cmd.changes_netmaps or cmd.changes_cluster_keys or \
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
        if isinstance(cmd, NodeDelete):
            out.append(self.index.remove_node(cmd.id, v))
        elif isinstance(cmd, NodeRemoveEphemeral):
            out.extend(self.index.remove_node(nid, v) for nid in value["removed"])
        elif isinstance(cmd, DnsSet):
            out.append(self.index.set_dns(value, v))
        elif cmd.result_lists_nodes:
            out.extend(self.index.upsert_node(n, v) for n in value["nodes"])
        elif cmd.result_is_node:
            out.append(self.index.upsert_node(value, v))
        elif isinstance(cmd, PolicySet):
            policy = self._interpret(cmd.args(), (value or {}).get("version"), v)
            if policy is not None:
                out.append(self.index.replace_policy(policy, v))
                self.serving = True
        # other routers whose primary routes the command moved (cluster/routes.py)
        out.extend(self.index.upsert_node(n, v) for n in result.get("routes_settled", ()))
        return out

    def _registrations(self, run: list[tuple[int, Command, dict]]) -> list[Changes]:
        """Registrations applied one after another (Raft commits concurrent ones together)
        as one change of the index: its netmaps are a function of the final state (nodes,
        clock), and one pass re-derives the filter sources they all extend once, not once
        each (an O(sources) tuple per ACL they send under: O(n) per registration)."""
        version, latest, out = run[-1][0], max(cmd.time for _, cmd, _ in run), []
        if latest > self.index.now:
            out.append(self.index.advance_time(latest, version))
        out.append(self.index.upsert_nodes([result["value"] for _, _, result in run], version))
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
        or a full netmap when `since` is unknown, too old, ahead of this feed (the caller
        waits for the feed to catch up first), or before a filter change made while the
        node was not watched (its history lacks it). None when the node is not visible."""
        if not self.index.is_visible(node_id):
            return None
        h = self._history.get(node_id, _History(self.floor))
        if since is None or since < h.floor or since > self.version or \
                self.index.filter_changed_after(node_id, since):
            return self.full(node_id)
        i = bisect.bisect_right(h.entries, since, key=lambda e: e[0])
        out = NetmapDelta(self.version)
        for _, d in h.entries[i:]:
            out = compose_deltas(out, d)
        return _restamp(out, self.version)


INF = float("inf")


def _expiry(result: dict) -> float:
    expiry = result["value"].get("key_expiry")
    return INF if expiry is None else expiry


def _took_effect(result: dict) -> bool:
    return bool(result.get("ok")) and not result.get("replayed")


def _restamp(d: NetmapDelta, version: int) -> NetmapDelta:
    if d.version == version:
        return d
    return NetmapDelta(version, d.peers_changed, d.peers_removed, d.packet_filter, d.self_node,
                       d.dns)
