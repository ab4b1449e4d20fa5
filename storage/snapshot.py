"""Raft snapshots made from LMDB's own consistent copy, in one self-describing file.

pysyncobj's default snapshot forks and pickles the object; an LMDB environment must not
cross fork(), and we pickle nothing of ours. Its serializer hook receives the two last
applied log entries and the member list; we store them as a JSON header followed by a
compacted copy of data.mdb. The same file is what pysyncobj streams to a lagging follower.
The state is pinned by a read transaction on the Raft thread and copied from it on another
(cluster/raft/background_snapshot.py), so writing a large state does not stall replication.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import struct
from dataclasses import dataclass

import lmdb

from .durable_files import fsync_dir
from .state_store import LmdbTxn, StateStore, read_version

MAGIC = b"RMSNAP1\n"
_LEN = struct.Struct("<I")


def _entry_json(entry) -> list:
    command, idx, term = entry
    return [base64.b64encode(bytes(command)).decode(), idx, term]


def _entry_tuple(obj) -> tuple:
    return (base64.b64decode(obj[0]), obj[1], obj[2])


@dataclass
class PinnedState:
    """The state as of one applied index, held by an LMDB read transaction, plus the
    snapshot header describing it: taken on the Raft thread, written from any thread."""

    txn: lmdb.Transaction
    header: bytes


def pin_state(store: StateStore, raft_data: tuple) -> PinnedState:
    """On the Raft thread, right after apply: commit, then hold that state for the copy."""
    last_entry, prev_entry, cluster = raft_data
    txn = store.pin()
    version = read_version(LmdbTxn(txn, store.dbs))
    header = json.dumps({
        "last_entry": _entry_json(last_entry), "prev_entry": _entry_json(prev_entry),
        "members": sorted(n if isinstance(n, str) else n.id for n in cluster),
        "state_version": version,
    }).encode()
    return PinnedState(txn, header)


def write_pinned(store: StateStore, pinned: PinnedState, path: str) -> None:
    """Write the snapshot file (header, then LMDB's compacted copy of the pinned state) and
    fsync it; releases the pin. Runs while the Raft thread goes on applying. The caller
    renames the file into place and fsyncs the directory."""
    try:
        # O_DSYNC: each of LMDB's ~1 MiB writes reaches the disk before the next. One fsync
        # of the whole ~20 MB copy at the end made every replica's journal fsync wait for
        # it: all in-flight writes stalled 120-140 ms once per snapshot (docs/benchmarks.md).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DSYNC, 0o600)
        try:
            os.write(fd, MAGIC + _LEN.pack(len(pinned.header)) + pinned.header)
            store.copy_pinned(fd, pinned.txn)  # continues at the descriptor's offset
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        pinned.txn.abort()


def read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError(f"{path} is not a raftmesh snapshot")
        (n,) = _LEN.unpack(f.read(_LEN.size))
        return json.loads(f.read(n)), len(MAGIC) + _LEN.size + n


def _make_durable(path: str) -> None:
    """pysyncobj writes a snapshot received from the leader without fsync, then clears the
    journal it replaces; the store installed from it is not fsynced either (state_store)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def load_snapshot(store: StateStore, path: str) -> tuple:
    """Install the snapshot unless local state is already as new; returns pysyncobj's tuple.

    Local state can be newer: at start-up LMDB already holds everything applied before the
    restart, and the journal replay after the snapshot is skipped index by index.
    """
    _make_durable(path)
    header, offset = read_header(path)
    if header["state_version"] > store.applied_version():
        tmp = os.path.join(store.path, "incoming.mdb")
        with open(path, "rb") as src, open(tmp, "wb") as out:
            src.seek(offset)
            shutil.copyfileobj(src, out, 1 << 20)
        store.replace_with(tmp)
    return (_entry_tuple(header["last_entry"]), _entry_tuple(header["prev_entry"]),
            header["members"])
