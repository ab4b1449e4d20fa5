"""LMDB without fsync: what survives a process crash, what an OS crash discards, and
snapshots copied from a pinned state on a helper thread."""
import os
import subprocess
import sys
import threading

from pysyncobj.config import SERIALIZER_STATE

from raftmesh.cluster.raft.background_snapshot import BackgroundSerializer
from raftmesh.storage import snapshot
from raftmesh.storage.state_store import UNSYNCED_MARKER, StateStore, boot_id


def put_users(store, names, version):
    txn = store.write_txn()
    for n in names:
        txn.put("users", n, {"name": n})
    store.set_applied_version(txn, version)
    store.commit()


def users(store):
    with store.read() as txn:
        return {k for k, _ in txn.items("users")}


def test_commits_are_marked_unsynced_until_a_clean_close(tmp_path):
    path = str(tmp_path / "s")
    store = StateStore(path)
    assert not os.path.exists(os.path.join(path, UNSYNCED_MARKER)), "nothing written yet"
    put_users(store, ["a"], 1)
    with open(os.path.join(path, UNSYNCED_MARKER)) as f:
        assert f.read() == boot_id()
    store.close()
    assert not os.path.exists(os.path.join(path, UNSYNCED_MARKER)), "close syncs and unmarks"
    again = StateStore(path)
    assert not again.discarded_after_os_crash and users(again) == {"a"}
    again.close()


def test_a_killed_process_leaves_state_that_the_same_boot_keeps(tmp_path):
    path = str(tmp_path / "s")
    code = ("import os, sys; from raftmesh.storage.state_store import StateStore\n"
            "s = StateStore(sys.argv[1]); t = s.write_txn(); t.put('users', 'k', {'name': 'k'})\n"
            "s.set_applied_version(t, 7); s.commit(); os._exit(0)  # no close, no sync\n")
    subprocess.run([sys.executable, "-c", code, path], check=True, timeout=60)
    assert os.path.exists(os.path.join(path, UNSYNCED_MARKER))
    store = StateStore(path)
    assert not store.discarded_after_os_crash
    assert users(store) == {"k"} and store.applied_version() == 7
    store.close()


def test_unsynced_state_of_an_earlier_boot_is_discarded(tmp_path):
    """An OS crash may have torn the files any way: they go, and the replica rebuilds from
    its snapshot and journal (tests/test_cluster.py has that end to end)."""
    path = str(tmp_path / "s")
    store = StateStore(path)
    put_users(store, ["a", "b"], 2)
    store.close_unsynced()  # as if the OS went down: no sync, marker left behind
    with open(os.path.join(path, UNSYNCED_MARKER), "w") as f:
        f.write("another-boot")
    with open(os.path.join(path, "data.mdb"), "r+b") as f:
        f.write(b"\xff" * 8192)  # torn pages: must not be opened
    again = StateStore(path)
    assert again.discarded_after_os_crash
    assert users(again) == set() and again.applied_version() == 0
    assert not os.path.exists(os.path.join(path, UNSYNCED_MARKER))
    again.close()


def test_snapshot_is_copied_from_the_pinned_state_while_writes_go_on(tmp_path, monkeypatch):
    store = StateStore(str(tmp_path / "s"))
    put_users(store, ["a"], 5)
    release, written = threading.Event(), []
    real_write = snapshot.write_pinned

    def slow_write(store_, pinned, path):
        assert release.wait(10)
        real_write(store_, pinned, path)

    monkeypatch.setattr(snapshot, "write_pinned", slow_write)
    path = str(tmp_path / "raft.snapshot")
    ser = BackgroundSerializer(path, 1 << 20, store, lambda p: None, written.append)
    entry = lambda i: (b"cmd", i, 1)
    ser.serialize((None, entry(5), entry(4), {"127.0.0.1:1"}), 4)  # returns at once
    assert ser.checkSerializing() == (SERIALIZER_STATE.SERIALIZING, 4)
    assert ser.getTransmissionData("peer") is None, "no streaming of a half-written file"
    put_users(store, ["b"], 6)  # the Raft thread goes on applying meanwhile
    release.set()
    ser.wait()
    assert ser.checkSerializing() == (SERIALIZER_STATE.SUCCESS, 4) and len(written) == 1
    assert ser.checkSerializing() == (SERIALIZER_STATE.NOT_SERIALIZING, None)
    copy = StateStore(str(tmp_path / "copy"))
    last, prev, members = snapshot.load_snapshot(copy, path)
    assert (last[1], prev[1], members) == (5, 4, ["127.0.0.1:1"])
    assert users(copy) == {"a"} and copy.applied_version() == 5, "the state when it was pinned"
    copy.close()

    # A snapshot received from the leader lands after a write of ours still running.
    release.clear()
    ser.serialize((None, entry(6), entry(5), {"127.0.0.1:1"}), 5)
    waiting, real_wait = threading.Event(), ser.wait
    ser.wait = lambda: (waiting.set(), real_wait())[1]
    receiving = threading.Thread(target=ser.setTransmissionData, args=((b"received", True, True),))
    receiving.start()
    assert waiting.wait(10), "the last chunk waits for a write of ours still running"
    with open(path, "rb") as f:
        assert f.read() != b"received", "not renamed into place while ours is unwritten"
    release.set()
    receiving.join(10)
    with open(path, "rb") as f:
        assert f.read() == b"received"
    ser.close()
    store.close()


def test_hot_meta_records_and_the_version_reach_lmdb_with_the_batch(tmp_path):
    """clock, audit head... and the applied version are rewritten by every command: they
    are held in the store's cache and put once, when the tick's batch commits."""
    from raftmesh.storage.state_store import read_version
    store = StateStore(str(tmp_path / "s"))
    txn = store.write_txn()
    txn.put("meta", "clock", 5.0)
    store.set_applied_version(txn, 3)
    assert txn._txn.get(b"clock", db=store.dbs["meta"]) is None, "held back until commit"
    assert store.write_txn().get("meta", "clock") == 5.0 and store.writer_version() == 3
    store.commit()
    with store.read() as r:
        assert r.get("meta", "clock") == 5.0 and read_version(r) == 3
    txn = store.write_txn()
    txn.delete("meta", "clock")
    txn.put("meta", "idem:1", "r1")
    assert [k for k, _ in txn.items("meta")] == ["applied_version", "idem:1"], "sees held-back writes"
    store.commit()
    with store.read() as r:
        assert r.get("meta", "clock") is None and r.get("meta", "idem:1") == "r1"
    store.close()


def test_committed_pages_are_written_out_each_interval_and_the_marker_stays(tmp_path, monkeypatch):
    """The writeback thread flushes what was committed (so the kernel never writes a burst
    of hundreds of MB that stalls the journal's fsync), keeps the unsynced marker (later
    commits are unsynced again), survives a snapshot install, and ends with the store."""
    from raftmesh.storage import state_store
    from conftest import wait_until
    monkeypatch.setattr(state_store, "WRITEBACK_INTERVAL", 0.05)
    flushes = []
    original = StateStore._flush_committed
    monkeypatch.setattr(StateStore, "_flush_committed",
                        lambda self: flushes.append(1) or original(self))
    path = str(tmp_path / "s")
    store = StateStore(path)
    put_users(store, ["a"], 1)
    wait_until(lambda: flushes, 10, what="a flush after a commit")
    n = len(flushes)
    assert os.path.exists(os.path.join(path, UNSYNCED_MARKER))
    other = StateStore(str(tmp_path / "other"))
    put_users(other, ["b"], 7)
    copy = str(tmp_path / "copy.mdb")
    with open(copy, "wb") as f:
        txn = other.pin()
        other.copy_pinned(f.fileno(), txn)
        txn.abort()
    other.close()
    put_users(store, ["c"], 2)
    store.replace_with(copy)  # swaps the environment the thread flushes
    n = len(flushes)
    put_users(store, ["d"], 8)
    wait_until(lambda: len(flushes) > n, 10, what="a flush of the new environment")
    store.close()
    assert not store._writeback.is_alive()
    again = StateStore(path)
    assert users(again) == {"b", "d"}
    again.close()
