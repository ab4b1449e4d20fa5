"""Raft snapshots made from LMDB's own consistent copy, in one self-describing file.

pysyncobj's default snapshot forks and pickles the object; an LMDB environment must not
cross fork(), and we pickle nothing of ours. Its serializer hook receives the two last
applied log entries and the member list; we store them as a JSON header followed by a
compacted copy of data.mdb. The same file is what pysyncobj streams to a lagging follower.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import tempfile

from .journal import fsync_dir
from .state_store import StateStore

MAGIC = b"RMSNAP1\n"
_LEN = struct.Struct("<I")


def _entry_json(entry) -> list:
    command, idx, term = entry
    return [base64.b64encode(bytes(command)).decode(), idx, term]


def _entry_tuple(obj) -> tuple:
    return (base64.b64decode(obj[0]), obj[1], obj[2])


def write_snapshot(store: StateStore, path: str, raft_data: tuple) -> int:
    """Write `path` (pysyncobj passes a tmp path and renames it); returns the state version."""
    last_entry, prev_entry, cluster = raft_data
    workdir = tempfile.mkdtemp(prefix=".snap-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        store.copy_to(workdir)
        version = store.applied_version()
        header = json.dumps({
            "last_entry": _entry_json(last_entry), "prev_entry": _entry_json(prev_entry),
            "members": sorted(n if isinstance(n, str) else n.id for n in cluster),
            "state_version": version,
        }).encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out, open(os.path.join(workdir, "data.mdb"), "rb") as src:
            out.write(MAGIC + _LEN.pack(len(header)) + header)
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        fsync_dir(os.path.dirname(os.path.abspath(path)))
        return version
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError(f"{path} is not a raftmesh snapshot")
        (n,) = _LEN.unpack(f.read(_LEN.size))
        return json.loads(f.read(n)), len(MAGIC) + _LEN.size + n


def load_snapshot(store: StateStore, path: str) -> tuple:
    """Install the snapshot unless local state is already as new; returns pysyncobj's tuple.

    Local state can be newer: at start-up LMDB already holds everything applied before the
    restart, and the journal replay after the snapshot is skipped index by index.
    """
    header, offset = read_header(path)
    if header["state_version"] > store.applied_version():
        tmp = os.path.join(store.path, "incoming.mdb")
        with open(path, "rb") as src, open(tmp, "wb") as out:
            src.seek(offset)
            shutil.copyfileobj(src, out, 1 << 20)
        store.replace_with(tmp)
    return (_entry_tuple(header["last_entry"]), _entry_tuple(header["prev_entry"]),
            header["members"])
