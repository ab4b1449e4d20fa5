"""Raft snapshots written on a helper thread instead of inside the Raft tick.

pysyncobj calls its serializer inside the tick and, unless it forks (which an LMDB
environment must not cross), waits for it: copying and fsyncing the whole state stalled
replication on that replica for tens of milliseconds per snapshot at test sizes, and would
outlast an election timeout for a large state. Here the tick only pins the state (an LMDB
read transaction, storage/snapshot.py) and the copy runs on a helper thread; pysyncobj
learns the outcome through checkSerializing, as it would from a forked child, and only then
drops the journal entries the snapshot covers.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from typing import Callable

from pysyncobj.config import SERIALIZER_STATE
from pysyncobj.serializer import Serializer

from raftmesh.storage import snapshot
from raftmesh.storage.durable_files import fsync_dir
from raftmesh.storage.state_store import StateStore

log = logging.getLogger("raftmesh.snapshot")
_WRITING = -3  # pysyncobj's "a child is serializing" pid: it streams no snapshot meanwhile


class BackgroundSerializer(Serializer):
    """pysyncobj's Serializer (streaming and receiving unchanged) with threaded writing."""

    def __init__(self, path: str, batch_size: int, store: StateStore,
                 deserializer: Callable, on_written: Callable[[float], None]):
        super().__init__(path, batch_size, False, None, deserializer, None)
        self._path, self._store, self._on_written = path, store, on_written
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot")
        self._job: Future | None = None
        self._id = 0

    def serialize(self, data, id):
        """On the Raft thread: pin the state pysyncobj just applied; the copy goes on."""
        if self._job is not None:
            return
        _, last_entry, prev_entry, cluster = data
        pinned = snapshot.pin_state(self._store, (last_entry, prev_entry, cluster))
        self._id = id
        self._Serializer__pid = _WRITING
        self._job = self._writer.submit(self._write, pinned)

    def _write(self, pinned: snapshot.PinnedState) -> None:
        started = time.monotonic()
        tmp = self._path + ".writing"
        snapshot.write_pinned(self._store, pinned, tmp)
        os.replace(tmp, self._path)
        fsync_dir(os.path.dirname(os.path.abspath(self._path)))
        self._on_written(time.monotonic() - started)

    def checkSerializing(self):
        if self._job is None:
            return SERIALIZER_STATE.NOT_SERIALIZING, None
        if not self._job.done():
            return SERIALIZER_STATE.SERIALIZING, self._id
        job, self._job = self._job, None
        self._Serializer__pid = 0
        if job.exception() is not None:
            log.error("snapshot failed: %s", job.exception())
            return SERIALIZER_STATE.FAILED, self._id
        self._Serializer__transmissions = {}  # streams restart from the new file
        return SERIALIZER_STATE.SUCCESS, self._id

    def setTransmissionData(self, data):
        """A snapshot received from the leader is renamed into place with its last chunk:
        a write of ours still running must land first, not over it."""
        if data is not None and data[2]:
            self.wait()
        return super().setTransmissionData(data)

    def wait(self) -> None:
        """Block until a running write ended (before the state it pins is closed or replaced)."""
        if self._job is not None:
            wait_for_futures([self._job])

    def close(self) -> None:
        self.wait()
        self._writer.shutdown()
