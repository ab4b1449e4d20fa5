"""A follower that hears its leader never asks for pre-votes, whatever the offset between
pysyncobj's clock (CLOCK_MONOTONIC_RAW) and time.monotonic (NTP-slewed CLOCK_MONOTONIC).

Comparing pysyncobj's election deadline with time.monotonic made it pass early by that
offset (0.31 s on the test machine): followers asked all the time, and the first peer
without a leader (one back from isolation) granted it, deposing the working leader
(the intermittent tests/test_availability.py pre-vote test)."""
import time

import pysyncobj.syncobj as pso
import pytest
from pysyncobj.node import TCPNode
from raft_by_hand import append_entries, capture_sends, close, hand_driven

from raftmesh.cluster.raft.pysyncobj_replica import PREVOTE
from raftmesh.lab.local_cluster import free_ports


@pytest.fixture
def follower(tmp_path):
    me, leader_port, other_port = free_ports(3)
    leader = TCPNode(f"127.0.0.1:{leader_port}")
    r = hand_driven(str(tmp_path / "f"), f"127.0.0.1:{me}", [leader.address, f"127.0.0.1:{other_port}"])
    r._SyncObj__connectedNodes.add(leader)  # what the transport does when the link is up
    yield r, leader
    close(r)


@pytest.mark.parametrize("raw_behind", [0.0, 0.31, 2.0])
def test_a_follower_hearing_its_leader_asks_for_no_pre_vote(follower, monkeypatch, raw_behind):
    r, leader = follower
    monkeypatch.setattr(pso, "monotonicTime", lambda: time.monotonic() - raw_behind)
    sent = capture_sends(r)
    r._SyncObj__onMessageReceived(leader, append_entries(1, 1, 0, [], 1))  # a heartbeat, just now
    r._flush_outbox()
    sent.clear()
    r._hold_election()
    r._flush_outbox()
    assert [m for _, m in sent if m.get("type") == PREVOTE] == [], \
        f"asked for pre-votes right after a heartbeat (pysyncobj's clock {raw_behind} s behind)"


def test_a_follower_whose_leader_went_silent_asks(follower, monkeypatch):
    """The same check does fire once the deadline has passed on pysyncobj's own clock."""
    r, leader = follower
    offset = [0.31]
    monkeypatch.setattr(pso, "monotonicTime", lambda: time.monotonic() - offset[0])
    sent = capture_sends(r)
    r._SyncObj__onMessageReceived(leader, append_entries(1, 1, 0, [], 1))
    r._flush_outbox()
    sent.clear()
    offset[0] -= r.config.election_max + 0.01  # pysyncobj's clock moves past any deadline
    r._hold_election()
    r._flush_outbox()
    asks = [m for _, m in sent if m.get("type") == PREVOTE]
    assert asks and asks[0]["term"] == r.raftCurrentTerm + 1
