"""pysyncobj starts an election only in the tick whose pre-vote round a majority granted.

`_hold_election` looks at the election deadline, then the tick's own election check looks
again a moment later. When the deadline passed in between (the Raft thread descheduled or
waiting for the GIL on a loaded machine), pysyncobj stood for election without asking: a
replica cut off on one side (a one-way partition) raised its term where nobody could hear
it, ignored the working leader's lower-term heartbeats after the heal and was refused
every pre-vote, so it stayed out of the cluster for good (`raftmesh chaos run --faults
oneway --seed 5 --duration 20`: `settled` failed, r1 a candidate at term 3 under a leader
at term 2), or its vote request deposed that leader when it got through."""
import time

import pysyncobj.syncobj as pso
import pytest
from pysyncobj.node import TCPNode
from raft_by_hand import append_entries, capture_sends, close, hand_driven

from raftmesh.cluster.raft.pysyncobj_replica import PREVOTE, PREVOTE_GRANTED
from raftmesh.lab.local_cluster import free_ports


@pytest.fixture
def follower(tmp_path, monkeypatch):
    """A follower that just heard its leader, on a pysyncobj clock the test moves."""
    me, leader_port, other_port = free_ports(3)
    leader, other = TCPNode(f"127.0.0.1:{leader_port}"), TCPNode(f"127.0.0.1:{other_port}")
    r = hand_driven(str(tmp_path / "f"), f"127.0.0.1:{me}", [leader.address, other.address])
    r._SyncObj__connectedNodes.update({leader, other})  # what the transport does when links are up
    offset = [0.0]
    monkeypatch.setattr(pso, "monotonicTime", lambda: time.monotonic() + offset[0])
    r._SyncObj__onMessageReceived(leader, append_entries(1, 1, 0, [], 1))  # a heartbeat, just now
    r._flush_outbox()
    yield r, other, offset
    close(r)


def test_a_deadline_passing_between_the_pre_vote_check_and_the_tick_starts_no_election(follower):
    r, _, offset = follower
    sent = capture_sends(r)
    r._hold_election()  # the deadline is still ahead: nothing to ask yet
    offset[0] += r.config.election_max + 0.01  # ... and passes before the tick looks at it
    r.doTick(0)
    r._flush_outbox()
    assert (r.raftCurrentTerm, r._SyncObj__raftState) == (1, 0), "stood for election unasked"
    assert not [m for _, m in sent if m["type"] == "request_vote"]


def test_a_granted_pre_vote_still_starts_the_election_in_that_tick(follower):
    r, other, offset = follower
    sent = capture_sends(r)
    offset[0] += r.config.election_max + 0.01
    r._hold_election()
    r._flush_outbox()
    ask = next(m for _, m in sent if m["type"] == PREVOTE)
    r._SyncObj__onMessageReceived(other, {"type": PREVOTE_GRANTED, "term": ask["term"]})
    r._hold_election()
    r.doTick(0)
    r._flush_outbox()
    assert r.raftCurrentTerm == ask["term"] == 2
    assert [m["term"] for _, m in sent if m["type"] == "request_vote"] == [2, 2]


def test_grants_given_before_a_leader_was_heard_are_not_reused(follower):
    """Pre-votes say "nobody leads me now": once a leader is heard they are stale. A replica
    kept them, and the next time its deadline passed (chaos: the leader it became stepping
    down when a one-way partition cut it off, 9 s later) it stood for election at once."""
    r, other, offset = follower
    leader = next(n for n in r._SyncObj__otherNodes if n != other)
    sent = capture_sends(r)
    offset[0] += r.config.election_max + 0.01
    r._hold_election()
    r._flush_outbox()
    r._SyncObj__onMessageReceived(other, {"type": PREVOTE_GRANTED, "term": 2})
    r._SyncObj__onMessageReceived(leader, append_entries(1, 1, 0, [], 1))  # the leader after all
    offset[0] += r.config.election_max + 0.01  # ... silent again
    sent.clear()
    r._hold_election()
    r.doTick(0)
    r._flush_outbox()
    assert r.raftCurrentTerm == 1, "stood for election on the old round's grants"
    assert [m["term"] for _, m in sent if m["type"] == PREVOTE] == [2, 2], "asks again"
