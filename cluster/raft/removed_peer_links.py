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
"""
from __future__ import annotations

from typing import Callable


class RemovedPeerLinks:
    def __init__(self, transport, removal_index: Callable[[], int]):
        """`removal_index()` is the log index of the change being applied (called from
        the transport's dropNode, which pysyncobj calls while it applies one)."""
        self._removal_index = removal_index
        self._drop_now, self._add = transport.dropNode, transport.addNode
        self._pending: dict = {}  # node -> index whose commit makes its removal final
        destroy = transport.destroy

        def destroy_all():
            transport.dropNode = self._drop_now  # closing: every link goes now
            self._pending.clear()
            destroy()

        transport.dropNode, transport.addNode, transport.destroy = self._drop_later, self._readd, destroy_all

    def _drop_later(self, node) -> None:
        self._pending[node] = self._removal_index()

    def _readd(self, node) -> None:
        if self._pending.pop(node, None) is None:
            self._add(node)
        # else: the removal was rolled back (or undone) before it committed: the link is there

    def drop_committed(self, commit_index: int) -> None:
        """Close the links of peers whose removal is now committed."""
        for node, index in list(self._pending.items()):
            if commit_index >= index:
                del self._pending[node]
                self._drop_now(node)
