"""Commits that travel with the next entries (cluster/raft/lazy_commit.py): a leader holds a
commit index nobody waits on, a follower holds what it learned committed, and neither holds
what a follower's own caller waits on. Pure parts first, then replicas driven by hand."""
from __future__ import annotations

import threading

import pytest
from pysyncobj.node import TCPNode
from raft_by_hand import append_entries, capture_sends, close, hand_driven, user_entry, users

from raftmesh.cluster.commands import UserCreate
from raftmesh.lab.local_cluster import free_ports
from raftmesh.cluster.raft.lazy_commit import ForwardedCommands, Hold
from raftmesh.cluster.raft import Outcome

FOREVER = 3600.0


def test_a_hold_starts_with_the_first_held_work_and_is_due_after_its_delay():
    h = Hold(0.005)
    assert h.remaining(10.0) is None
    assert h.due(10.0) is False and h.remaining(10.001) == pytest.approx(0.004)
    assert h.due(10.004) is False, "a later check does not restart the hold"
    assert h.due(10.005) is True and h.remaining(10.2) == 0.0
    h.release()
    assert h.remaining(10.2) is None and h.due(10.2) is False
    h.release()
    h.expire()
    assert h.due(10.2) is True and h.remaining(10.2) == 0.0


def test_forwarded_commands_name_the_followers_whose_entries_committed():
    f = ForwardedCommands()
    f.add(5, "a")
    f.add(6, "b")
    f.add(9, "a")
    assert f.committed(4) == set()
    assert f.committed(6) == {"a", "b"} and len(f) == 1
    assert f.committed(8) == set()
    assert f.committed(9) == {"a"} and len(f) == 0
    f.add(12, "c")
    f.clear()
    assert f.committed(100) == set()


def ends_within(r, seconds: float) -> bool:
    """Whether a tick allowed to wait FOREVER for messages ends within `seconds`; a tick
    still waiting is woken, so the test ends either way."""
    tick = threading.Thread(target=r.doTick, args=(FOREVER,))
    tick.start()
    tick.join(seconds)
    if tick.is_alive():
        r._notifier.notify()
        tick.join(5)
        return False
    return True


@pytest.fixture
def pair(tmp_path):
    me, peer = (f"127.0.0.1:{p}" for p in free_ports(2))
    r = hand_driven(str(tmp_path / "r"), me, [peer])
    r._SyncObj__connectedNodes.add(TCPNode(peer))  # its messages come over a connection
    yield r, TCPNode(peer)
    close(r)


def receive_held(r, leader, names: list[str], commit: int) -> None:
    """Entries creating `names` from index 2, and `commit`: a follower holds them."""
    r._apply_hold.delay = FOREVER
    entries = [user_entry(r, i, 1, name) for i, name in enumerate(names, start=2)]
    r._SyncObj__onMessageReceived(leader, append_entries(1, 1, 0, entries, commit))
    r.doTick(0)
    assert r.raftCommitIndex == commit and r.raftLastApplied == 1 and users(r) == []


def test_a_follower_applies_what_it_learned_committed_once_the_hold_is_due(pair):
    r, leader = pair
    receive_held(r, leader, ["u2", "u3", "u4"], 4)
    r._apply_hold.release()
    r._apply_hold.delay = 0.004
    assert ends_within(r, 5), "the tick that began the hold waits no longer than the hold"
    assert r.raftLastApplied == 1
    r._apply_hold.delay = 0
    r.doTick(0)
    assert r.raftLastApplied == 4 and users(r) == ["u2", "u3", "u4"]
    assert r._apply_hold.remaining(0) is None, "applying releases the hold"


def test_a_follower_applies_at_once_a_commit_index_that_came_without_entries(pair):
    """The leader held it already: writes paused, there is nothing to batch."""
    r, leader = pair
    receive_held(r, leader, ["u2", "u3"], 2)
    r._SyncObj__onMessageReceived(leader, append_entries(1, 3, 1, [], 3))
    r.doTick(0)
    assert r.raftLastApplied == 3 and users(r) == ["u2", "u3"]
    assert r._apply_hold.remaining(0) is None


def test_a_follower_applies_at_once_what_its_own_caller_waits_on(pair):
    r, leader = pair
    r._apply_hold.delay = FOREVER
    sent = capture_sends(r)
    r._SyncObj__onMessageReceived(leader, append_entries(1, 1, 0, [user_entry(r, 2, 1, "a")], 1))
    r.doTick(0)  # the leader is known now: proposals are forwarded to it
    fut = r.propose(UserCreate(name="mine", time=1.0))
    r.doTick(0)
    (forwarded,) = [m for _, m in sent if m["type"] == "apply_command"]
    r._SyncObj__onMessageReceived(leader, {"type": "apply_command_response", "log_idx": 3,
                                           "log_term": 1, "request_id": forwarded["request_id"]})
    r._SyncObj__onMessageReceived(leader, append_entries(1, 2, 1, [user_entry(r, 3, 1, "mine")], 3))
    r.doTick(0)
    assert fut.result(timeout=5).kind == Outcome.APPLIED
    assert r.raftLastApplied == 3 and users(r) == ["a", "mine"]


def make_leader(r, peer):
    """Leader of a two-member cluster whose follower is `peer` (never elected: installed)."""
    r._SyncObj__conf.appendEntriesPeriod = FOREVER  # no heartbeat sends behind the test's back
    r._SyncObj__conf.leaderFallbackTimeout = FOREVER
    (node,) = r._SyncObj__otherNodes
    assert node == peer
    r._SyncObj__connectedNodes.add(node)
    r._SyncObj__setCurrentTerm(1, r.config.raft_addr)
    sent = capture_sends(r)
    r._SyncObj__onBecomeLeader()  # appends its no-op entry
    r._flush_outbox()
    return node, sent


def ack(r, node, upto):
    r._SyncObj__onMessageReceived(node, {"type": "next_node_idx", "next_node_idx": upto + 1,
                                         "reset": False, "success": True})


def appends(sent):
    return [m for _, m in sent if m["type"] == "append_entries"]


def test_a_leader_sends_a_commit_index_nobody_waits_on_with_the_next_entries(pair):
    r, peer = pair
    r._commit_hold.delay = FOREVER
    node, sent = make_leader(r, peer)
    noop = r._SyncObj__raftLog[-1][1]
    ack(r, node, noop)
    sent.clear()
    r.doTick(0)
    assert r.raftCommitIndex == noop and appends(sent) == [], "held, not sent alone"
    fut = r.propose(UserCreate(name="a", time=1.0))
    r.doTick(0)
    (m,) = appends(sent)
    assert [e[1] for e in m["entries"]] == [noop + 1] and m["commit_index"] == noop
    ack(r, node, noop + 1)
    sent.clear()
    r.doTick(0)
    assert fut.result(timeout=5).kind == Outcome.APPLIED and appends(sent) == []
    r._commit_hold.release()
    r._commit_hold.delay = 0.004
    assert ends_within(r, 5) and appends(sent) == [], "the hold began, and bounds the wait"
    r._commit_hold.delay = 0
    r.doTick(0)
    (m,) = appends(sent)
    assert m["entries"] == [] and m["commit_index"] == noop + 1, "sent alone once due"


def test_a_leader_tells_a_follower_at_once_when_its_forwarded_command_commits(pair):
    r, peer = pair
    r._commit_hold.delay = FOREVER
    node, sent = make_leader(r, peer)
    ack(r, node, r._SyncObj__raftLog[-1][1])
    r.doTick(0)
    theirs = user_entry(r, 0, 0, "theirs")[0]  # a command as a follower forwards it
    r._SyncObj__onMessageReceived(node, {"type": "apply_command", "request_id": 7, "command": theirs})
    r.doTick(0)
    (response,) = [m for _, m in sent if m["type"] == "apply_command_response"]
    idx = response["log_idx"]
    ack(r, node, idx)
    sent.clear()
    r.doTick(0)
    (m,) = appends(sent)
    assert m["entries"] == [] and m["commit_index"] == idx
    assert "theirs" in users(r)


def test_a_replica_that_stops_leading_drops_what_it_held(pair):
    r, peer = pair
    r._commit_hold.delay = FOREVER
    node, _ = make_leader(r, peer)
    ack(r, node, r._SyncObj__raftLog[-1][1])
    r._forwarded.add(99, node)
    r.doTick(0)
    assert r._commit_hold.remaining(0) is not None
    r._SyncObj__onMessageReceived(node, append_entries(2, r._SyncObj__raftLog[-1][1],
                                                       1, [], r.raftCommitIndex))
    assert not r._isLeader()
    assert r._idle_wait(0.05) == 0.05, "no hold left to wake the tick early"
    assert r._commit_hold.remaining(0) is None and len(r._forwarded) == 0
