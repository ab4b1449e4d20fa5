"""LMDB holding the replicated state: the edge where the state machine meets the disk.

The state machine (cluster/state_machine.py) sees only the `Txn` protocol below; this
module supplies it over LMDB. Every applied command and the state version it produces are
written in one LMDB transaction, so a restarted replica knows exactly where it is.
Writes from one Raft tick share a transaction (one fsync per batch).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import lmdb

from .json_codec import compact_json, loads_utf8

TABLES = (
    "meta", "users", "nodes", "preauth_keys", "api_keys", "policy_versions",
    "audit", "idempotency", "members", "node_ips", "node_by_machine", "cluster_keys",
    "node_names",
)
_VERSION_KEY = b"applied_version"
CACHED_META = frozenset({"clock", "audit_head", "policy_head", "ip_cursor"})
MAP_SIZE = 8 << 30


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
    `meta` records (CACHED_META) that every command reads back, kept up to date by put/delete
    here. They are replaced whole, never mutated in place, so sharing the objects is safe.
    """

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any],
                 meta_cache: dict[str, Any] | None = None):
        self._txn = txn
        self._dbs = dbs
        self._meta = meta_cache

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
        self._txn.put(key.encode(), _dumps(value), db=self._dbs[table])
        if self._meta is not None and table == "meta" and key in CACHED_META:
            self._meta[key] = value

    def put_raw(self, table: str, key: str, data: bytes) -> None:
        """Store a value its caller already encoded as JSON (audit entries, encoded once)."""
        self._txn.put(key.encode(), data, db=self._dbs[table])
        if self._meta is not None and table == "meta":
            self._meta.pop(key, None)

    def delete(self, table: str, key: str) -> None:
        self._txn.delete(key.encode(), db=self._dbs[table])
        if self._meta is not None and table == "meta" and key in CACHED_META:
            self._meta[key] = None

    def items(self, table: str, start: str = "") -> Iterator[tuple[str, Any]]:
        """Entries in key order from `start` (inclusive)."""
        with self._txn.cursor(db=self._dbs[table]) as cur:
            if not cur.set_range(start.encode()):
                return
            for k, v in cur.iternext(keys=True, values=True):
                yield k.decode(), _loads(v)


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
        self._open()

    def _open(self) -> None:
        # metasync=False keeps ACI and integrity on power loss; durability of the newest
        # transactions comes from the Raft journal, which is replayed idempotently.
        self.env = lmdb.open(self.path, max_dbs=len(TABLES) + 1, map_size=MAP_SIZE,
                             metasync=False, sync=True, mode=0o600)
        self.dbs = {name: self.env.open_db(name.encode()) for name in TABLES}

    def close(self) -> None:
        self.commit()
        self.env.close()

    # -- writes (Raft tick thread only) -----------------------------------------------
    def write_txn(self) -> LmdbTxn:
        if self._write is None:
            self._write = self.env.begin(write=True)
        return LmdbTxn(self._write, self.dbs, self._meta_cache)

    def commit(self) -> bool:
        """Commit the batch opened by write_txn(); True if there was one."""
        if self._write is None:
            return False
        self._write.commit()
        self._write = None
        return True

    def set_applied_version(self, txn: LmdbTxn, version: int) -> None:
        txn._txn.put(_VERSION_KEY, str(version).encode(), db=self.dbs["meta"])

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
    def copy_to(self, directory: str) -> None:
        """Consistent compacted copy of the committed state (LMDB's own copy)."""
        self.commit()
        os.makedirs(directory, exist_ok=True)
        self.env.copy(directory, compact=True)

    def replace_with(self, data_mdb: str) -> None:
        """Install a snapshot's data.mdb in place of the current state."""
        with self._lock:
            self.commit()
            self.env.close()
            for name in ("data.mdb", "lock.mdb"):
                try:
                    os.unlink(os.path.join(self.path, name))
                except FileNotFoundError:
                    pass
            shutil.move(data_mdb, os.path.join(self.path, "data.mdb"))
            self._meta_cache.clear()
            self._open()
            self.env.sync(True)


def read_version(txn: LmdbTxn) -> int:
    raw = txn._txn.get(_VERSION_KEY, db=txn._dbs["meta"])
    return int(raw) if raw else 0
