"""The pysyncobj 0.3.17 follower truncation ("state machine may have diverged"), reproduced.

When an AppendEntries arrives whose prevLogIdx lies below the follower's last entry (a
resend after a stale `next_node_idx` reset, common with short tick periods), stock
pysyncobj deletes every entry after prevLogIdx even though they match the leader's, and
only re-adds the ones in the message. Entries it had acknowledged and applied vanish from
its log, so the leader's matchIndex overstates what the follower holds. The tests drive a
follower with exactly those messages, against stock pysyncobj and against RaftReplica.
"""
import logging

import pytest
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.config import FAIL_REASON
from pysyncobj.node import TCPNode
from raft_by_hand import append_entries, close, hand_driven, regular, user_entry, users

from raftmesh.lab.local_cluster import free_ports

class Counter(SyncObj):
    def __init__(self, addr, peer):
        super().__init__(addr, [peer], SyncObjConf(autoTick=False, password="x" * 16))
        self.value = 0

    @replicated
    def incr(self, n):
        self.value += n
        return self.value


@pytest.fixture
def addrs():
    a, b = free_ports(2)
    return f"127.0.0.1:{a}", f"127.0.0.1:{b}"


def test_stock_pysyncobj_truncates_applied_matching_entries(addrs, caplog):
    """Documents the upstream behaviour the replica works around."""
    me, leader_addr = addrs
    f = Counter(me, leader_addr)
    leader = TCPNode(leader_addr)
    try:
        log = [(regular(f, "incr", 1), i, 1) for i in range(2, 12)]
        f._SyncObj__onMessageReceived(leader, append_entries(1, 1, 0, log, 11))
        f.doTick(0)
        assert f.raftLastApplied == 11 and f.value == 10
        with caplog.at_level(logging.CRITICAL, logger="pysyncobj.syncobj"):
            f._SyncObj__onMessageReceived(leader, append_entries(1, 5, 1, log[4:6], 11))
        assert f._SyncObj__raftLog[-1][1] == 7, "entries 8..11 were deleted although they matched"
        assert f.raftLastApplied == 11 > f._SyncObj__raftLog[-1][1]
        assert "state machine may have diverged" in caplog.text
    finally:
        f.destroy()


@pytest.fixture
def follower(tmp_path, addrs):
    me, leader_addr = addrs
    r = hand_driven(str(tmp_path / "f"), me, [leader_addr])
    r._apply_hold.delay = 0  # apply what is committed at the next tick (see test_lazy_commit)
    yield r, TCPNode(leader_addr)
    close(r)


def test_replica_keeps_matching_entries_and_state(follower):
    r, leader = follower
    log = [user_entry(r, i, 1, f"u{i}") for i in range(2, 12)]
    r._SyncObj__onMessageReceived(leader, append_entries(1, 1, 0, log, 11))
    r.doTick(0)
    assert r.raftLastApplied == 11 and len(users(r)) == 10
    digest = r.store.digest()
    r._SyncObj__onMessageReceived(leader, append_entries(1, 5, 1, log[4:6], 11))
    r.doTick(0)
    assert r.journal[-1][1] == 11, "matching entries after the new ones are kept"
    assert r.raftCommitIndex == 11 and r.raftLastApplied == 11
    assert r.store.digest() == digest, "nothing re-applied, nothing lost"
    r.doTick(0)
    assert r.journal.dirty is False


def test_commit_is_bounded_by_the_last_entry_the_leader_vouched_for(follower):
    """Raft: commitIndex = min(leaderCommit, index of last new entry). A tail kept from an
    old term must not be committed on the strength of a message that did not cover it."""
    r, leader = follower
    base = [user_entry(r, i, 1, f"u{i}") for i in range(2, 6)]
    r._SyncObj__onMessageReceived(leader, append_entries(1, 1, 0, base, 5))
    stale_tail = [user_entry(r, 6, 2, "stale6"), user_entry(r, 7, 2, "stale7")]
    r._SyncObj__onMessageReceived(leader, append_entries(2, 5, 1, stale_tail, 5))
    # A new leader (term 3) whose entry 6 matches but whose entry 7 differs, commit 7:
    r._SyncObj__onMessageReceived(leader, append_entries(3, 5, 1, stale_tail[:1], 7))
    r.doTick(0)
    assert r.raftCommitIndex == 6
    assert "stale7" not in users(r) and "stale6" in users(r)
    # The conflicting entry arrives: the stale one is replaced, then committed.
    r._SyncObj__onMessageReceived(leader, append_entries(3, 6, 2, [user_entry(r, 7, 3, "new7")], 7))
    r.doTick(0)
    assert r.journal[-1][1:] == (7, 3)
    assert "new7" in users(r) and "stale7" not in users(r)


def test_followers_fsync_before_acknowledging(follower):
    """Acks are queued while messages are handled and fsynced once when flushed: whatever
    leaves for the leader, the entries it acknowledges are on disk by then."""
    r, leader = follower
    sent = []
    r._send_now = lambda node, message: sent.append((message, r.journal.dirty, r.journal.syncs))
    syncs = r.journal.syncs
    r._SyncObj__onMessageReceived(leader, append_entries(1, 1, 0, [user_entry(r, 2, 1, "a")], 1))
    r._SyncObj__onMessageReceived(leader, append_entries(1, 2, 1, [user_entry(r, 3, 1, "b")], 1))
    assert not sent and r.journal.dirty, "acks wait for the flush"
    r._flush_outbox()
    (batch, dirty, syncs_at_send), = sent
    acks = [m for m in batch["messages"] if m["type"] == "next_node_idx"]
    assert [m["next_node_idx"] for m in acks] == [3, 4] and all(m["success"] for m in acks)
    assert dirty is False and syncs_at_send == syncs + 1, "one fsync, before anything left"


def test_a_snapshot_chunk_commits_nothing_the_follower_holds(follower):
    """pysyncobj moved a follower's commit index to min(leader's commit, its own last
    entry) on every snapshot chunk, before any log matching: a deposed leader's uncommitted
    tail was applied, and its clients told 201 for writes no majority ever stored (chaos
    campaign, seed 77: a leader resumed after SIGSTOP, far enough behind to be sent a
    snapshot)."""
    r, leader = follower
    committed = [user_entry(r, i, 1, f"u{i}") for i in range(2, 5)]
    r._SyncObj__onMessageReceived(leader, append_entries(1, 1, 0, committed, 4))
    stale_tail = [user_entry(r, 5, 1, "stale5"), user_entry(r, 6, 1, "stale6")]
    r._SyncObj__onMessageReceived(leader, append_entries(1, 4, 1, stale_tail, 4))
    r.doTick(0)
    assert r.raftCommitIndex == 4 and "stale5" not in users(r)
    answers = []  # the deposed leader's own client, waiting on entry 5 of term 1
    r._SyncObj__commandsWaitingCommit[5].append((1, lambda res, err: answers.append(err)))
    chunk = {"type": "append_entries", "term": 2, "commit_index": 500,
             "serialized": (b"first part of a snapshot", True, False)}
    r._SyncObj__onMessageReceived(leader, chunk)
    r.doTick(0)
    assert r.raftCommitIndex == 4, "a chunk vouches for no entry of this log"
    assert "stale5" not in users(r) and "stale6" not in users(r)
    assert FAIL_REASON.SUCCESS not in answers, "never told success"
