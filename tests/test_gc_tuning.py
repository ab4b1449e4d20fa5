"""GcTuning: the replica's garbage-collector policy around its netmap feed's index changes."""
from __future__ import annotations

import gc
import weakref

from raftmesh.api import gc_tuning
from raftmesh.api.gc_tuning import GcTuning
from raftmesh.cluster import netmap_feed
from raftmesh.cluster.netmap_feed import NetmapFeed

from test_netmap import NOW, node
from test_netmap_feed import POLICIES, ok, record, stored


def test_the_feed_itself_leaves_the_collector_alone():
    """Pure: without a process's hooks the collector runs through a change as usual."""
    assert "gc" not in vars(netmap_feed)
    feed = NetmapFeed(stored(POLICIES[0]), [node(1, "alice")], NOW, 10)
    seen = []
    changes = feed._changes
    feed._changes = lambda *a: seen.append(gc.isenabled()) or changes(*a)
    feed.apply_batch([(11, record("node.register", {}, time=NOW), ok(node(2, "bob")))])
    assert seen == [True]


def test_large_feed_refreezes_the_gc_as_it_churns(monkeypatch):
    """A large index is frozen out of the collector's reach when built, and again once its
    changes plus the deltas they made reach REFREEZE_EVERY (every FULL_REFREEZE_EVERY-th
    time after an unfreeze, to reclaim cycles that died frozen); a small one never."""
    calls = []
    monkeypatch.setattr(gc_tuning, "FREEZE_MIN_NODES", 3)
    monkeypatch.setattr(gc_tuning, "REFREEZE_EVERY", 5)
    monkeypatch.setattr(gc_tuning, "FULL_REFREEZE_EVERY", 2)
    monkeypatch.setattr(gc_tuning, "tune_gc_for_large_index", lambda: calls.append("tune"))
    monkeypatch.setattr(gc_tuning, "refreeze_gc", lambda full: calls.append(("refreeze", full)))
    nodes = [node(i, "alice") for i in range(4)]
    # each flips one node's online flag: 1 change + 3 deltas (its peers) = 4 units of churn
    upd = [(v, record("node.update", {}, time=NOW), ok(dict(nodes[v % 4], online=v % 2 == 0)))
           for v in range(11, 21)]
    feed = NetmapFeed(stored(POLICIES[0]), nodes, NOW, 10, hooks=GcTuning())
    assert calls == ["tune"]
    feed.apply_batch(upd[:1])
    assert calls == ["tune"]
    feed.apply_batch(upd[1:2])  # 8 units since the freeze
    assert calls == ["tune", ("refreeze", False)]
    feed.apply_batch(upd[2:4])
    assert calls == ["tune", ("refreeze", False), ("refreeze", True)]
    small = NetmapFeed(stored(POLICIES[0]), nodes[:2], NOW, 10, hooks=GcTuning())
    small.apply_batch([u for u in upd if u[0] % 4 < 2])  # its own two nodes only
    assert calls == ["tune", ("refreeze", False), ("refreeze", True)]


def test_feed_tunes_the_gc_when_its_index_grows_large(monkeypatch):
    """Clusters start empty: the treatment comes when the index reaches the size."""
    calls = []
    monkeypatch.setattr(gc_tuning, "FREEZE_MIN_NODES", 3)
    monkeypatch.setattr(gc_tuning, "tune_gc_for_large_index", lambda: calls.append("tune"))
    monkeypatch.setattr(gc_tuning, "refreeze_gc", lambda full: calls.append(("refreeze", full)))
    feed = NetmapFeed(stored(POLICIES[0]), [node(1, "alice")], NOW, 10, hooks=GcTuning())
    reg = lambda v, i: (v, record("node.register", {}, time=NOW), ok(node(i, "alice")))  # noqa: E731
    feed.apply_batch([reg(11, 2)])
    assert calls == []
    feed.apply_batch([reg(12, 3)])
    assert calls == ["tune"]
    feed.apply_batch([reg(13, 4)])
    assert calls == ["tune"]


def test_refreeze_gc_reclaims_frozen_cycles_when_full():
    try:
        junk = [[]]
        junk[0].append(junk)  # a cycle, frozen while alive, garbage afterwards
        gc_tuning.refreeze_gc()
        assert gc.get_freeze_count() > 0
        del junk
        frozen = gc.get_freeze_count()
        gc_tuning.refreeze_gc(full=True)  # unfreezes first: the cycle is reclaimed
        assert gc.get_freeze_count() < frozen
    finally:
        gc.unfreeze()


def test_changes_run_with_the_collector_paused(monkeypatch):
    """No automatic collection inside a change (its objects would be walked for nothing),
    the collector back on after it, even when the change fails, and left off when the
    process had turned it off."""
    feed = NetmapFeed(stored(POLICIES[0]), [node(1, "alice")], NOW, 10, hooks=GcTuning())
    seen = []
    changes = feed._changes
    monkeypatch.setattr(feed, "_changes", lambda *a: seen.append(gc.isenabled()) or changes(*a))
    assert gc.isenabled()
    feed.apply_batch([(11, record("node.register", {}, time=NOW), ok(node(2, "bob")))])
    assert seen == [False] and gc.isenabled() and feed.version == 11
    monkeypatch.setattr(feed, "_changes", lambda *a: 1 / 0)
    try:
        feed.apply_batch([(12, record("node.register", {}, time=NOW), ok(node(3, "bob")))])
    except ZeroDivisionError:
        pass
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_tuning.collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_large_change_of_a_large_index_is_frozen_when_it_ends(monkeypatch):
    """Instead of the young collection it deferred walking everything it left behind; a
    smaller change, or any change of a small index, leaves that collection as it was."""
    frozen = []
    monkeypatch.setattr(gc_tuning, "FREEZE_MIN_NODES", 3)
    monkeypatch.setattr(gc_tuning, "FREEZE_AFTER_DELTAS", 4)
    monkeypatch.setattr(gc_tuning, "tune_gc_for_large_index", lambda: None)
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(gc.isenabled()))
    nodes = [node(i, "alice") for i in range(4)]
    policy = lambda v, text: (v, record("policy.set", {"text": text}, time=NOW), ok({}))  # noqa: E731
    flip = lambda v, i: (v, record("node.update", {}, time=NOW), ok(dict(nodes[i], online=True)))  # noqa: E731
    feed = NetmapFeed(stored(POLICIES[2]), nodes, NOW, 10, hooks=GcTuning())  # only bob may reach alice: no peers
    assert len(feed.apply_batch([flip(11, 0)]).deltas) == 1  # its own record: below 4
    assert frozen == []
    assert len(feed.apply_batch([policy(12, POLICIES[0])]).deltas) == 4  # every node
    assert frozen == [False] and gc.isenabled()  # frozen before the collector is back on
    small = NetmapFeed(stored(POLICIES[2]), nodes[:2], NOW, 10, hooks=GcTuning())  # below FREEZE_MIN_NODES
    monkeypatch.setattr(gc_tuning, "FREEZE_AFTER_DELTAS", 2)
    assert len(small.apply_batch([policy(11, POLICIES[0])]).deltas) == 2
    assert frozen == [False]


def test_cycles_that_die_frozen_are_reclaimed_within_full_refreeze_every_large_changes(monkeypatch):
    """Every freeze at the end of a large change also freezes other threads' garbage cycles
    and live objects that die later; they must not wait for a re-freeze (rare: every
    REFREEZE_EVERY units), or a policy change every 30 s grows the heap for good (soak)."""
    monkeypatch.setattr(gc_tuning, "FREEZE_MIN_NODES", 3)
    monkeypatch.setattr(gc_tuning, "FREEZE_AFTER_DELTAS", 4)
    monkeypatch.setattr(gc_tuning, "FULL_REFREEZE_EVERY", 3)
    monkeypatch.setattr(gc_tuning, "tune_gc_for_large_index", lambda: None)
    nodes = [node(i, "alice") for i in range(4)]
    feed = NetmapFeed(stored(POLICIES[2]), nodes, NOW, 10, hooks=GcTuning())

    class Connection:  # a closed connection's objects: garbage only the collector can free
        pass
    try:
        conn = Connection()
        conn.self = conn
        gone = weakref.ref(conn)
        policies = [POLICIES[0], POLICIES[2]] * 2
        changes = [feed.apply_batch([(11 + i, record("policy.set", {"text": text}, time=NOW), ok({}))])
                   for i, text in enumerate(policies[:2])]  # frozen while alive
        assert all(len(c.deltas) == 4 for c in changes) and gone() is not None
        del conn, changes
        gc.collect()
        assert gone() is not None  # dead, but frozen
        feed.apply_batch([(13, record("policy.set", {"text": policies[2]}, time=NOW), ok({}))])
        assert gone() is None  # the third freeze is a full one
    finally:
        gc.unfreeze()
