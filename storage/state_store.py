"""LMDB holding the replicated state: the edge where the state machine meets the disk.

The state machine (cluster/state_machine.py) sees only the `Txn` protocol below; this
module supplies it over LMDB. Every applied command and the state version it produces are
written in one LMDB transaction, so a restarted replica knows exactly where it is.
Writes from one Raft tick share a transaction.

LMDB here is a cache of the Raft snapshot plus the journal, which are what make applied
commands durable (both fsynced; docs/durability.md section 1). Commits therefore do not
fsync: that was the costliest step of every tick (~1.5 ms of each replica's apply path
under load). Without the fsync LMDB stays consistent across a process crash (its pages
are in the kernel's page cache) but not across an OS crash, so a marker file names the
boot (kernel boot id) whose page cache holds unsynced commits; a store opened under a
different boot discards its files and the replica rebuilds them from snapshot and journal.

A helper thread still writes LMDB's dirty pages out every WRITEBACK_INTERVAL, for latency,
not durability: left to the kernel they piled up (~270 MB in 30 s at 4,500 writes/s) and
were written in one burst that held every replica's journal fsync for 80-85 ms at once.

The map is writable (`writemap`): a commit then writes its pages in place instead of with a
pwrite() per page (~8 system calls per write at one client), 7% more writes per second at
one client (docs/benchmarks.md). The cost: data.mdb is a sparse file as large as MAP_SIZE,
and on a full disk apply touching a page that has no block yet is a SIGBUS, not a failed
commit. So blocks are kept allocated ahead of LMDB's last page (`has_room`), and the
replica stops replicating while they cannot be (cluster/raft/pysyncobj_replica.py).
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import lmdb

from .durable_files import fsync_dir, write_file_durably
from .json_codec import compact_json, loads_utf8

log = logging.getLogger("raftmesh.state")

TABLES = (
    "meta", "users", "nodes", "preauth_keys", "api_keys", "policy_versions",
    "audit", "idempotency", "members", "node_ips", "node_by_machine", "cluster_keys",
    "node_names", "logins", "login_index", "scim", "scim_names", "route_sets",
    "node_routes", "console_sessions",
)
_VERSION_KEY = b"applied_version"
CACHED_META = frozenset({"clock", "audit_head", "policy_head", "ip_cursor"})
MAP_SIZE = 8 << 30
UNSYNCED_MARKER = "unsynced-since-boot"  # in the store's directory; see the module doc
WRITEBACK_INTERVAL = 1.0  # seconds between flushes of committed pages (see the module doc)
_BOOT_ID = "/proc/sys/kernel/random/boot_id"
# data.mdb bytes kept allocated beyond LMDB's last page (see has_room); allocation is
# renewed once less than half of it is left, so one tick would have to write more than
# 2 MiB of new pages (several maximal policies at once) to reach an unallocated one. Every
# replica holds it on disk, test clusters included: hence not more.
SPACE_RESERVE = 4 << 20


# Values keep their dict insertion order instead of sorted keys: nothing hashes stored
# values (the audit chain hashes its own canonical encoding, storage/audit_chain.py), and the
# order is as deterministic as apply itself (handlers build records in a fixed order; args
# come from the same command bytes on every replica; json.loads keeps order), so replicas'
# digests still agree.
_dumps_str = compact_json(sort_keys=False)


def _dumps(value: Any) -> bytes:
    return _dumps_str(value).encode()


_loads = loads_utf8


class LmdbTxn:
    """The state machine's view of one LMDB transaction (JSON values, str keys).

    A write transaction shares its store's `meta_cache`: decoded values of the few fixed
    `meta` records (CACHED_META) that every command reads back and rewrites (clock, audit
    head...). Writes to them stay in the cache (`meta_dirty`) and reach LMDB once, when the
    store commits the tick's batch, instead of being encoded and put by every command.
    They are replaced whole, never mutated in place, so sharing the objects is safe.
    """

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any],
                 meta_cache: dict[str, Any] | None = None,
                 meta_dirty: set[str] | None = None):
        self._txn = txn
        self._dbs = dbs
        self._meta = meta_cache
        self._dirty = meta_dirty

    def get(self, table: str, key: str) -> Any:
        cache = self._meta if table == "meta" and key in CACHED_META else None
        if cache is not None and key in cache:
            return cache[key]
        raw = self._txn.get(key.encode(), db=self._dbs[table])
        value = None if raw is None else _loads(raw)
        if cache is not None:
            cache[key] = value
        return value

    def put(self, table: str, key: str, value: Any) -> None:
        if self._dirty is not None and table == "meta" and key in CACHED_META:
            self._meta[key] = value
            self._dirty.add(key)
            return
        self._txn.put(key.encode(), _dumps(value), db=self._dbs[table])

    def put_raw(self, table: str, key: str, data: bytes) -> None:
        """Store a value its caller already encoded as JSON (audit entries, encoded once)."""
        self._txn.put(key.encode(), data, db=self._dbs[table])
        if self._meta is not None and table == "meta":
            self._meta.pop(key, None)
            self._dirty.discard(key)

    def delete(self, table: str, key: str) -> None:
        if self._dirty is not None and table == "meta" and key in CACHED_META:
            self._meta[key] = None
            self._dirty.add(key)
            return
        self._txn.delete(key.encode(), db=self._dbs[table])

    def items(self, table: str, start: str = "") -> Iterator[tuple[str, Any]]:
        """Entries in key order from `start` (inclusive)."""
        if table == "meta" and self._dirty:
            write_back_meta(self)
        with self._txn.cursor(db=self._dbs[table]) as cur:
            if not cur.set_range(start.encode()):
                return
            for k, v in cur.iternext(keys=True, values=True):
                yield k.decode(), _loads(v)


def write_back_meta(txn: LmdbTxn) -> None:
    """Put the meta records held back in the cache (a None value was deleted)."""
    for key in txn._dirty:
        value = txn._meta[key]
        if value is None:
            txn._txn.delete(key.encode(), db=txn._dbs["meta"])
        else:
            txn._txn.put(key.encode(), _dumps(value), db=txn._dbs["meta"])
    txn._dirty.clear()


class StateStore:
    """Owns the LMDB environment; swaps it whole when a snapshot is installed."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(path, mode=0o700, exist_ok=True)
        self._lock = threading.Lock()  # guards env swaps against concurrent readers
        self._write: lmdb.Transaction | None = None
        # Decoded `meta` values as written by the one writer (see LmdbTxn); valid across
        # commits because every write goes through write_txn(); dropped when a snapshot
        # replaces the environment.
        self._meta_cache: dict[str, Any] = {}
        self._meta_dirty: set[str] = set()  # cached meta records not yet put (see LmdbTxn)
        self._writer_version: int | None = None  # applied version as the writer left it
        self._marked = False  # the unsynced marker is written for this boot
        self.discarded_after_os_crash = self._discard_if_os_crashed()
        self._open()
        # The writeback thread syncs self.env outside _lock (readers must not wait for a
        # flush); swapping or closing the environment waits for a flush in progress.
        self._env_flush = threading.Lock()
        self._committed_since_flush = False
        self._closing = threading.Event()
        self._writeback = threading.Thread(target=self._writeback_loop, daemon=True,
                                           name="lmdb-writeback")
        self._writeback.start()

    def _open(self) -> None:
        # sync=False: see the module doc; the marker protocol below replaces the fsync.
        self.env = lmdb.open(self.path, max_dbs=len(TABLES) + 1, map_size=MAP_SIZE,
                             sync=False, metasync=False, writemap=True, mode=0o600)
        self.dbs = {name: self.env.open_db(name.encode()) for name in TABLES}
        self._page_size = self.env.stat()["psize"]
        self._allocated = 0  # data.mdb bytes known to have blocks (see has_room)

    def has_room(self) -> bool:
        """Whether data.mdb has blocks for SPACE_RESERVE bytes past LMDB's last page,
        allocating them when less than half is left; False when the disk is too full.

        A page without a block is a SIGBUS when apply writes it on a full disk (writemap,
        module doc): a chaos `disk` fault killed a follower two writes after the disk
        filled. Pages inside the reserve cannot fail, and the replica stops taking
        entries as soon as the reserve cannot be renewed."""
        used = (self.env.info()["last_pgno"] + 1) * self._page_size
        if used + SPACE_RESERVE // 2 <= self._allocated:
            return True
        fd = os.open(os.path.join(self.path, "data.mdb"), os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, used + SPACE_RESERVE)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            return False
        finally:
            os.close(fd)
        self._allocated = used + SPACE_RESERVE
        return True

    def _discard_if_os_crashed(self) -> bool:
        """Remove the LMDB files when commits of an earlier boot were never synced.

        After an OS crash or power loss they may be torn in any way (pages reach the disk
        in no particular order); the replica rebuilds the state from its snapshot and
        journal, like a new member. An unknown boot id counts as another boot."""
        marker = os.path.join(self.path, UNSYNCED_MARKER)
        try:
            with open(marker) as f:
                marked_boot = f.read().strip()
        except FileNotFoundError:
            return False
        if marked_boot and marked_boot == boot_id():
            return False  # only the process ended: the page cache still has every commit
        self._remove_lmdb_files()
        os.unlink(marker)
        fsync_dir(self.path)
        return True

    def _remove_lmdb_files(self) -> None:
        for name in ("data.mdb", "lock.mdb"):
            try:
                os.unlink(os.path.join(self.path, name))
            except FileNotFoundError:
                pass

    def _mark_unsynced(self) -> None:
        """Before the first commit that is not fsynced: name this boot as its keeper."""
        write_file_durably(os.path.join(self.path, UNSYNCED_MARKER), (boot_id() or "").encode())
        self._marked = True

    def sync(self) -> None:
        """fsync every commit so far and drop the marker: the files stand on their own."""
        self.env.sync(True)
        marker = os.path.join(self.path, UNSYNCED_MARKER)
        if os.path.exists(marker):
            os.unlink(marker)
            fsync_dir(self.path)
        self._marked = False

    def close(self) -> None:
        self._stop_writeback()
        self.commit()
        self.sync()
        self.env.close()

    def close_unsynced(self) -> None:
        """Close leaving the files as they are (marker included): for readers of a stopped
        replica's state that must not change it, and for tests of what a crash leaves."""
        self._stop_writeback()
        self.env.close()

    def _stop_writeback(self) -> None:
        self._closing.set()
        self._writeback.join(timeout=10)

    def _writeback_loop(self) -> None:
        while not self._closing.wait(WRITEBACK_INTERVAL):
            if self._committed_since_flush:
                self._committed_since_flush = False
                self._flush_committed()

    def _flush_committed(self) -> None:
        """Write committed pages out (the marker stays: later commits are unsynced again)."""
        with self._env_flush:
            if self._closing.is_set():
                return
            try:
                self.env.sync(True)
            except lmdb.Error as e:  # not fatal: the journal and snapshot hold the state
                log.warning("writing out committed pages of %s failed: %s", self.path, e)

    # -- writes (Raft tick thread only) -----------------------------------------------
    def write_txn(self) -> LmdbTxn:
        if self._write is None:
            self._write = self.env.begin(write=True)
        return LmdbTxn(self._write, self.dbs, self._meta_cache, self._meta_dirty)

    def commit(self) -> bool:
        """Commit the batch opened by write_txn(); True if there was one."""
        if self._write is None:
            return False
        if not self._marked:
            self._mark_unsynced()
        write_back_meta(self.write_txn())
        if self._writer_version is not None:
            self._write.put(_VERSION_KEY, str(self._writer_version).encode(), db=self.dbs["meta"])
        self._write.commit()
        self._write = None
        self._committed_since_flush = True
        return True

    def set_applied_version(self, txn: LmdbTxn, version: int) -> None:
        """Recorded with the batch's commit (one put per tick, not per command)."""
        self._writer_version = version

    def writer_version(self) -> int:
        """The applied version including the open batch (Raft thread only)."""
        if self._writer_version is None:
            self._writer_version = read_version(self.write_txn())
        return self._writer_version

    # -- reads (any thread) -----------------------------------------------------------
    @contextmanager
    def read(self) -> Iterator[LmdbTxn]:
        with self._lock:
            with self.env.begin() as txn:
                yield LmdbTxn(txn, self.dbs)

    def applied_version(self) -> int:
        with self.read() as txn:
            return read_version(txn)

    def digest(self) -> tuple[int, str]:
        """(version, sha256 over every table) so replicas can be compared for convergence."""
        h = hashlib.sha256()
        with self.read() as txn:
            version = read_version(txn)
            for name in TABLES:
                for k, v in txn._txn.cursor(db=self.dbs[name]):
                    h.update(name.encode() + b"\0" + k + b"\0" + v + b"\n")
        return version, h.hexdigest()

    # -- snapshots ----------------------------------------------------------------------
    def pin(self) -> lmdb.Transaction:
        """Commit pending writes and return a read transaction on the result, for a copy
        taken on another thread; the caller aborts it. Raft thread only."""
        self.commit()
        return self.env.begin()

    def copy_pinned(self, fd: int, txn: lmdb.Transaction) -> None:
        """LMDB's compacted copy of the state `txn` sees, written to `fd` at its offset."""
        self.env.copyfd(fd, compact=True, txn=txn)

    def replace_with(self, data_mdb: str) -> None:
        """Install a snapshot's data.mdb in place of the current state (not fsynced: the
        snapshot file it came from is the durable copy)."""
        with self._lock, self._env_flush:
            self.commit()
            if not self._marked:
                self._mark_unsynced()
            self.env.close()
            self._remove_lmdb_files()
            shutil.move(data_mdb, os.path.join(self.path, "data.mdb"))
            self._meta_cache.clear()
            self._writer_version = None
            self._open()


def read_version(txn: LmdbTxn) -> int:
    raw = txn._txn.get(_VERSION_KEY, db=txn._dbs["meta"])
    return int(raw) if raw else 0


def boot_id() -> str | None:
    """The running kernel's boot id: it changes when the OS restarts, not when a process does."""
    try:
        with open(_BOOT_ID) as f:
            return f.read().strip()
    except OSError:
        return None
