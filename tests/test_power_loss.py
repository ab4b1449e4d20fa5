"""Power loss: the lab disk model (lab/lazy_disk.py), the journal on the FUSE filesystem that
serves it (lab/lazy_fs.py), and chaos runs with power cuts: with fsync nothing acknowledged
is lost; with `durability = "none"` the same cuts lose acknowledged writes and the checks say so."""
from __future__ import annotations

import argparse
import json
import os

import pytest

from raftmesh.chaos import run as chaos_run
from raftmesh.chaos.schedule import FAULTS, make_schedule
from raftmesh.cluster.raft.background_snapshot import SERIALIZER_STATE, BackgroundSerializer
from raftmesh.lab import power, replica_net
from raftmesh.lab.lazy_disk import SECTOR, LazyDisk
from raftmesh.storage import snapshot, state_store
from raftmesh.storage.durable_files import fsync_dir
from raftmesh.storage.journal import DurableJournal
from raftmesh.storage.state_store import StateStore

from conftest import wait_until

needs_fuse = pytest.mark.skipif(bool(power.preflight()), reason="; ".join(power.preflight()))
needs_lab = pytest.mark.skipif(bool(power.preflight() + replica_net.preflight()),
                               reason="needs FUSE, root, iproute2 and nftables")


@pytest.fixture
def disk(tmp_path):
    (tmp_path / "backing").mkdir()
    return LazyDisk(str(tmp_path / "backing"), str(tmp_path / "holding"))


def _read(disk, name):
    with open(disk.real(name), "rb") as f:
        return f.read()


def _write_file(disk, name, data, fsync=True):
    fd = disk.open(name, os.O_RDWR | os.O_CREAT)
    disk.write(fd, data, 0)
    if fsync:
        disk.fsync(fd)
    os.close(fd)


# -- the model --------------------------------------------------------------------------------
def test_a_write_without_fsync_is_lost_and_one_with_fsync_is_kept(disk):
    _write_file(disk, "/f", b"durable!")
    disk.fsync_dir("/")
    fd = disk.open("/f", os.O_RDWR)
    disk.write(fd, b"LOST", 0)
    disk.write(fd, b" and grown", 8)
    assert _read(disk, "/f") == b"LOST" + b"ble! and grown", "reads see the latest writes"
    disk.power_cut()
    assert _read(disk, "/f") == b"durable!"
    disk.write(fd, b"kept", 0)
    disk.fsync(fd)
    disk.truncate(fd, 2)  # a truncation is undone like a write
    disk.power_cut()
    assert _read(disk, "/f") == b"keptble!"
    os.close(fd)


def test_names_are_durable_only_once_their_directory_is_synced(disk):
    _write_file(disk, "/old", b"1")  # its data is synced, its name is not
    disk.power_cut()
    assert not os.path.exists(disk.real("/old")), "fsync of a file does not make its name durable"
    _write_file(disk, "/a", b"a")
    _write_file(disk, "/b", b"b")
    disk.mkdir("/sub", 0o700)
    disk.fsync_dir("/")
    _write_file(disk, "/sub/new", b"x")
    _write_file(disk, "/tmp", b"replacement")
    disk.rename("/tmp", "/a")  # over a durable file, as write_file_durably does
    disk.unlink("/b")
    disk.power_cut()
    assert sorted(os.listdir(disk.backing)) == ["a", "b", "sub"]
    assert _read(disk, "/a") == b"a" and _read(disk, "/b") == b"b", "replaced and unlinked files come back"
    assert os.listdir(disk.real("/sub")) == []
    _write_file(disk, "/tmp", b"replacement")
    disk.rename("/tmp", "/a")
    disk.fsync_dir("/")
    disk.power_cut()
    assert sorted(os.listdir(disk.backing)) == ["a", "b", "sub"] and _read(disk, "/a") == b"replacement"


def test_a_torn_cut_keeps_some_unsynced_sectors_and_nothing_else(disk):
    _write_file(disk, "/f", bytes(8 * SECTOR))
    disk.fsync_dir("/")
    fd = disk.open("/f", os.O_RDWR)
    disk.write(fd, b"\xff" * (8 * SECTOR), 0)
    disk.power_cut(torn_seed=11)
    data = _read(disk, "/f")
    sectors = {data[i:i + SECTOR] for i in range(0, len(data), SECTOR)}
    assert len(data) == 8 * SECTOR and sectors == {bytes(SECTOR), b"\xff" * SECTOR}, \
        "whole sectors, some old and some new"
    disk.write(fd, b"\xff" * (8 * SECTOR), 0)
    disk.power_cut(torn_seed=11)
    assert _read(disk, "/f") == data, "the same seed tears the same way"
    os.close(fd)


# -- the journal on the FUSE filesystem -------------------------------------------------------
@pytest.fixture
def lazy_mount(tmp_path):
    d = power.PowerLossDisk(str(tmp_path / "disk"), str(tmp_path / "mnt"))
    d.mount()
    try:
        yield d
    finally:
        d.unmount()
    assert not d.mounted()


def _cut(d):
    d.freeze()
    report = d.cut()
    d.power_on()
    return report


def _load(path):
    """The entries a replica starting on this journal would see (the file closed again, so
    the disk can be unmounted)."""
    j = DurableJournal(path)
    os.close(j._fd)
    return [(bytes(c), i, t) for c, i, t in (j[k] for k in range(len(j)))]


@needs_fuse
@pytest.mark.timeout(60)
def test_a_new_journal_survives_a_power_cut_with_its_synced_entries(lazy_mount):
    """Regression: the journal file was created without syncing its directory, so a power cut
    could take the whole file, synced (acknowledged) entries included."""
    path = os.path.join(lazy_mount.mountpoint, "raft.journal")
    j = DurableJournal(path)
    j.add(b"acknowledged", 1, 1)
    j.sync()
    os.close(j._fd)  # the process died: nothing else syncs the directory
    _cut(lazy_mount)
    assert _load(path) == [(b"acknowledged", 1, 1)]


@needs_fuse
@pytest.mark.timeout(90)
def test_a_torn_journal_tail_is_dropped_never_misread(lazy_mount):
    """A cut tears the unsynced batch at sector granularity, in any order: every entry that
    loads is one that was written, whole, and every synced one loads."""
    synced = [(b"synced %d " % i * 40, i, 1) for i in range(1, 21)]
    for seed in range(6):
        path = os.path.join(lazy_mount.mountpoint, f"raft.journal.{seed}")
        j = DurableJournal(path)
        for e in synced:
            j.add(*e)
        j.sync()
        later = [(bytes([65 + seed]) * (300 + 97 * k), 21 + k, 2) for k in range(8)]
        for e in later:
            j.add(*e)
        j.flush()  # written, never synced
        os.close(j._fd)
        lazy_mount.freeze()
        assert lazy_mount.cut(torn_seed=seed)["writes_lost"] >= 1
        lazy_mount.power_on()
        loaded = _load(path)
        assert loaded[:20] == synced, f"seed {seed}: a synced entry changed"
        assert loaded[20:] == later[:len(loaded) - 20], f"seed {seed}: an unsynced entry came back wrong"


def _commit_users(store, version, count, size):
    txn = store.write_txn()
    for k in range(count):
        txn.put("users", f"v{version}-{k}", {"pad": "x" * size})
    store.set_applied_version(txn, version)
    store.commit()


def _applied_version_of_snapshot(path, tmp_path):
    fresh = StateStore(str(tmp_path / f"fresh{len(os.listdir(tmp_path))}"))
    try:
        snapshot.load_snapshot(fresh, path)
        return fresh.applied_version()
    finally:
        fresh.close()


@needs_fuse
@pytest.mark.timeout(60)
def test_a_written_snapshot_survives_a_power_cut_and_one_cut_short_leaves_the_previous(
        lazy_mount, tmp_path):
    """The background writer's protocol: O_DSYNC writes, fsync, rename, directory fsync."""
    path = os.path.join(lazy_mount.mountpoint, "raft.snapshot")
    for version, state_dir in ((10, "state"), (20, "state2")):
        store = StateStore(os.path.join(lazy_mount.mountpoint, state_dir))
        writer = BackgroundSerializer(path, 1 << 20, store, None, lambda seconds: None)
        try:
            _commit_users(store, version, 200, 20_000)  # ~4 MB: several writes of the copy
            if version == 20:
                lazy_mount.freeze()  # the new file's first synced write waits: being written
            writer.serialize((None, (b"c", version, 1), (b"p", version - 1, 1), ["a:1"]), version)
            if version == 10:
                writer.wait()
                assert writer.checkSerializing() == (SERIALIZER_STATE.SUCCESS, 10)
                lazy_mount.freeze()
            else:
                wait_until(lambda: os.path.exists(path + ".writing"), 10, what="the new snapshot's file")
            lazy_mount.cut(torn_seed=version)
            writer.wait()
        finally:
            writer.close()
            store.close_unsynced()
        lazy_mount.power_on()
        assert not os.path.exists(path + ".writing"), "a name that was never durable"
        assert _applied_version_of_snapshot(path, tmp_path) == 10
    assert writer.checkSerializing()[0] == SERIALIZER_STATE.FAILED, "the cut write failed"


@needs_fuse
@pytest.mark.timeout(60)
def test_lmdb_keeps_what_it_synced_through_its_map_and_is_discarded_after_a_reboot(
        lazy_mount, tmp_path, monkeypatch):
    """LMDB's writemap pages reach the disk only through msync (its env.sync, called by the
    writeback thread): a cut keeps the state as of the last one, consistent. After a reboot
    (a new boot id) the marker makes the store start empty whatever the disk kept."""
    boot = tmp_path / "boot_id"
    boot.write_text("boot-1\n")
    monkeypatch.setattr(state_store, "_BOOT_ID", str(boot))
    path = os.path.join(lazy_mount.mountpoint, "state")
    store = StateStore(path)
    fsync_dir(lazy_mount.mountpoint)  # as the replica's journal does when it creates its file
    _commit_users(store, 1, 20, 1000)
    store._flush_committed()  # what the writeback thread does every second
    _commit_users(store, 2, 20, 1000)  # dirty pages of the map only
    store.close_unsynced()
    _cut(lazy_mount)
    store = StateStore(path)
    assert not store.discarded_after_os_crash, "the same boot: only a process ended, for LMDB"
    assert store.applied_version() == 1, "the synced commit, not the later one"
    store.close_unsynced()
    boot.write_text("boot-2\n")
    _cut(lazy_mount)
    store = StateStore(path)
    try:
        assert store.discarded_after_os_crash and store.applied_version() == 0
    finally:
        store.close()


# -- chaos runs with power cuts ----------------------------------------------------------------
def test_power_cuts_run_only_when_asked_and_hit_every_replica_first():
    assert "powercut" not in FAULTS, "the default set needs no FUSE"
    events = make_schedule(3, 30, ["powercut"], 3)
    assert events == make_schedule(3, 30, ["powercut"], 3)
    assert [(e.target, e.params["torn"]) for e in events[:2]] == [("all", False), ("leader", True)]


def _chaos(tmp_path, *argv):
    parser = argparse.ArgumentParser()
    chaos_run.add_arguments(parser)
    out = tmp_path / "chaos"
    rc = chaos_run.main(parser.parse_args(["--faults", "powercut", "--out", str(out), *argv]))
    return rc, out, json.loads((out / "summary.json").read_text())


@needs_lab
@pytest.mark.timeout(240)
def test_power_cuts_of_one_and_of_every_replica_lose_nothing_acknowledged(tmp_path):
    rc, out, summary = _chaos(tmp_path, "--seed", "3", "--duration", "24")
    assert rc == 0, (out / "summary.txt").read_text()
    timeline = [json.loads(line) for line in (out / "faults.jsonl").read_text().splitlines()]
    assert {e["target"] for e in timeline} >= {"all"} and len({e["target"] for e in timeline}) >= 2, \
        "every replica at once, and one"
    assert summary["by_status"]["ok"] > 300
    for r in ("r1", "r2", "r3"):  # the cut was an OS restart to them: LMDB rebuilt
        assert "the OS restarted before its state was synced" in (out / "cluster" / f"{r}.log").read_text()
    assert not os.path.exists(out / "cluster" / "r1.disk"), "disks unmounted and removed"
    with open("/proc/self/mountinfo") as f:
        assert str(out) not in f.read()


@needs_lab
@pytest.mark.timeout(240)
def test_without_fsync_a_power_cut_of_every_replica_loses_acknowledged_writes(tmp_path):
    """The teeth: the same fault against replicas that do not fsync must fail the run."""
    rc, out, summary = _chaos(tmp_path, "--seed", "3", "--duration", "12", "--durability", "none",
                             "--settle", "15")
    assert rc == 1 and summary["verdict"] == "FAIL"
    checks = {c["name"]: c for c in json.loads((out / "checks.json").read_text())}
    assert not checks["linearizable"]["ok"], "reads after the cut miss acknowledged writes"
