"""A replica whose uncommitted removal of a peer is rolled back follows that peer as leader.

Chaos seed 61 (docs/chaos.md, bug 12): leader r3 appended "remove r2" and could not commit
it; r2 became leader. pysyncobj had dropped r2's link when the removal was appended and
refused r2's connections from then on, so r3 never received the entries that truncate the
removal: a follower without a leader at its old version for good.

Three replicas on real sockets, ticked by the test (no thread races it): the leader's own
messages are lost (a one-way partition) while it appends the removal, the removed peer is
elected by the third, then the partition heals.
"""
import math

import pytest
from pysyncobj.node import TCPNode
from raft_by_hand import close, hand_driven
from waiting import wait_until

from raftmesh.lab.local_cluster import free_ports

LEADER = 2  # pysyncobj's state number


@pytest.fixture
def trio(tmp_path):
    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    reps = [hand_driven(str(tmp_path / f"r{i}"), a, [b for b in addrs if b != a])
            for i, a in enumerate(addrs)]
    yield reps
    for r in reps:
        close(r)


def _ticking(reps, before_each=lambda: None):
    def tick() -> None:
        before_each()
        for r in reps:  # what RaftReplica._run does
            r._hold_election()
            r.doTick(0.002)
            r._flush_outbox()
    return tick


def _until(reps, predicate, what, timeout=15.0, before_each=lambda: None):
    tick = _ticking(reps, before_each)
    wait_until(lambda: tick() or predicate(), timeout=timeout, interval=0, what=what)


def _members(r) -> set:
    return {r.config.raft_addr} | {n.id for n in r._SyncObj__otherNodes}


def _leader(reps):
    return next((r for r in reps if r._SyncObj__raftState == LEADER), None)


def test_a_rolled_back_removal_keeps_the_removed_peer_able_to_lead(trio):
    _until(trio, lambda: (lead := _leader(trio)) is not None
           and lead.raftLastApplied >= lead._SyncObj__noopIDx
           and all(r.raftCommitIndex == lead.raftCommitIndex for r in trio), "a first leader")
    old = _leader(trio)
    removed, third = [r for r in trio if r is not old]
    send = old._send_now
    old._send_now = lambda node, message: True  # its messages are lost from here on

    old.change_membership("remove", removed.config.raft_addr)
    _until(trio, lambda: removed.config.raft_addr not in _members(old), "the removal appended")
    assert old._log_index() > old.raftCommitIndex, "the removal must not have committed"
    assert old._SyncObj__raftState == LEADER  # it heard its followers a moment ago
    late_ack = {"type": "next_node_idx", "term": old.raftCurrentTerm, "reset": False,
                "next_node_idx": old._log_index() + 1, "success": True}
    old._SyncObj__onMessageReceived(TCPNode(removed.config.raft_addr), late_ack)
    old.doTick(0)
    assert old._log_index() > old.raftCommitIndex, "an ack from outside the configuration counted"

    def third_waits():  # so that the removed peer is the one elected
        third._election_deadline = math.inf
    _until(trio, lambda: removed._SyncObj__raftState == LEADER, "the removed peer elected",
           before_each=third_waits)

    old._send_now = send  # the partition heals
    wait_for = lambda: (_members(old) == _members(removed) == _members(third)  # noqa: E731
                        and old._SyncObj__raftLeader == TCPNode(removed.config.raft_addr)
                        and old.raftCommitIndex == removed.raftCommitIndex == third.raftCommitIndex
                        and old._log_index() == removed._log_index())
    _until(trio, wait_for, "the old leader following the peer it had removed")
    assert len(_members(old)) == 3


def test_a_committed_removal_closes_the_removed_peers_link(trio):
    _until(trio, lambda: (lead := _leader(trio)) is not None
           and lead.raftLastApplied >= lead._SyncObj__noopIDx, "a leader")
    lead = _leader(trio)
    removed = next(r for r in trio if r is not lead)
    node = TCPNode(removed.config.raft_addr)
    lead.change_membership("remove", removed.config.raft_addr)
    _until(trio, lambda: node not in lead._SyncObj__transport._nodes, "the removal committed")
    assert removed.config.raft_addr not in _members(lead)


class _Transport:
    """The three transport calls RemovedPeerLinks wraps, recorded."""

    def __init__(self):
        self.calls = []
        self.dropNode = lambda node: self.calls.append(("drop", node))
        self.addNode = lambda node: self.calls.append(("add", node))
        self.destroy = lambda: self.calls.append(("destroy",))


def test_the_leader_keeps_its_link_when_an_older_configuration_leaves_it_out():
    """Campaign seed 2 (docs/chaos.md, bug 17): a fresh replica installed a snapshot taken
    while the leader r1 was out of the cluster (removed, later re-added); the snapshot's
    configuration dropped r1's link, the entries re-adding r1 could only come from r1, and
    the replica sat without a leader for good."""
    from raftmesh.cluster.raft.removed_peer_links import RemovedPeerLinks
    transport, leader = _Transport(), ["r1"]
    links = RemovedPeerLinks(transport, removal_index=lambda: 4998, leader=lambda: leader[0])
    transport.dropNode("r1")  # the snapshot's configuration, applied while r1 leads
    transport.dropNode("r4")  # a peer the same configuration removed
    links.drop_committed(5000)
    assert transport.calls == [("drop", "r4")], "the leader's link stays; the other removal is committed"
    transport.addNode("r1")  # the entry that adds r1 back, received from r1
    assert transport.calls == [("drop", "r4")], "the link was never closed, so nothing to reopen"
    transport.dropNode("r1")
    links.drop_committed(6000)
    assert ("drop", "r1") not in transport.calls, "kept while it leads"
    leader[0] = "r3"
    links.drop_committed(6000)
    assert transport.calls[-1] == ("drop", "r1"), "a former leader outside the configuration goes once another leads"
