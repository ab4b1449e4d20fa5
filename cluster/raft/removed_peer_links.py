"""A removed peer keeps its Raft link until its removal commits.

pysyncobj drops a peer's connection the moment a removal is appended, not committed, and
from then on refuses that peer's connections (its transport accepts only the addresses in
its configuration, and only the peer with the higher address connects). But an appended
configuration can be rolled back, and Raft requires a server to take AppendEntries and
RequestVote from servers outside its latest configuration (Ongaro's dissertation, 4.1):
chaos seed 61, leader r3 appended "remove r2", could not commit it, and r2 became leader.
r3 never heard from r2 again, so the entries that would have truncated the removal never
arrived, and r3 stayed behind without a leader for good (`settled` failed after 45 s).

Here the transport keeps a removed peer (its connection, its reconnects, and its address,
so its connections are accepted: they still prove the cluster secret, as every peer's do)
until the commit index reaches the entry that removed it; a new leader that rolls the
removal back finds the link in place. Only the transport is kept: the peer is out of the
configuration at once, as Raft wants (its votes and acknowledgements do not count, see
RaftReplica._SyncObj__onMessageReceived).

The leader this replica follows keeps its link whatever the configuration says, for as
long as it leads: a configuration without it can only be older than the leader's log.
Chaos campaign seed 2 (5 replicas): r1 was removed and re-added, then r2 was re-added fresh
and installed a snapshot taken between r1's removal and its return; the snapshot's
configuration dropped the link to r1, the leader that had sent it, so r2 never received the
entries that add r1 back and sat without a leader for good.
"""
from __future__ import annotations

from typing import Callable


class RemovedPeerLinks:
    def __init__(self, transport, removal_index: Callable[[], int], leader: Callable[[], object]):
        """`removal_index()` is the log index of the change being applied (called from
        the transport's dropNode, which pysyncobj calls while it applies one); `leader()`
        the node this replica follows now (None: none)."""
        self._removal_index, self._leader = removal_index, leader
        self._drop_now, self._add = transport.dropNode, transport.addNode
        # node -> index whose commit makes its removal final (None: kept while it leads us)
        self._pending: dict = {}
        destroy = transport.destroy

        def destroy_all():
            transport.dropNode = self._drop_now  # closing: every link goes now
            self._pending.clear()
            destroy()

        transport.dropNode, transport.addNode, transport.destroy = self._drop_later, self._readd, destroy_all

    def _drop_later(self, node) -> None:
        self._pending[node] = None if node == self._leader() else self._removal_index()

    def _readd(self, node) -> None:
        if node in self._pending:  # rolled back or undone before it went: the link is there
            del self._pending[node]
        else:
            self._add(node)

    def drop_committed(self, commit_index: int) -> None:
        """Close the links of peers whose removal is now committed, and of a former leader
        outside the configuration once another leader leads."""
        leader = self._leader()
        for node, index in list(self._pending.items()):
            if index is None and leader is not None and leader != node or \
                    index is not None and commit_index >= index:
                del self._pending[node]
                self._drop_now(node)
