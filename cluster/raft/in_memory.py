"""A deterministic, single-process implementation of the `Raft` interface, for tests of
what sits above Raft (the API, the stream hub): no sockets, threads, timers or elections.

Each proposal is applied at once, in the caller's thread, through the real state machine
into a real StateStore, one entry per batch; listeners and futures are handed on exactly
as the real replica hands them (applied.deliver). It is always the leader of a cluster of
itself. `script_outcomes` makes the next proposals end otherwise (not applied, or outcome
unknown), without applying them, as a lost leadership would.
"""
from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from concurrent.futures import Future
from typing import Callable

from raftmesh.cluster.commands import Barrier, Command
from raftmesh.cluster.config import ReplicaConfig
from raftmesh.storage.state_store import StateStore

from . import Outcome
from .applied import ApplyListener, apply_entry, deliver

TERM = 1


class InMemoryRaft:
    def __init__(self, config: ReplicaConfig):
        self.config = config
        os.makedirs(config.data_dir, mode=0o700, exist_ok=True)
        self.store = StateStore(os.path.join(config.data_dir, "state"))
        self.stats = {"snapshots": 0, "snapshot_seconds": 0.0, "snapshot_installs": 0, "slow_ticks": 0}
        self.status: dict = {}
        self._index = self.store.applied_version()  # LMDB write transactions stay in _commit
        self._members = [config.raft_addr] + list(config.peers)
        self._apply_listeners: list[ApplyListener] = []
        self._reset_listeners: list[Callable[[], None]] = []
        self._propose_listeners: list[Callable[[Command], None]] = []
        self._scripted: deque[Outcome] = deque()
        self._lock = threading.Lock()  # one entry at a time, in order, whichever thread proposes
        self._refresh_status()

    def script_outcomes(self, *outcomes: Outcome) -> None:
        """The next proposals (barriers and membership changes too) end with these, in order."""
        with self._lock:
            self._scripted.extend(outcomes)

    # -- the interface -------------------------------------------------------------------
    def propose(self, cmd: Command) -> Future:
        fut: Future = Future()
        self._proposing(cmd)
        self._commit(cmd, fut)
        return fut

    def propose_async(self, cmd: Command) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self._proposing(cmd)
        self._commit(cmd, fut)
        return fut

    def _proposing(self, cmd: Command) -> None:
        for fn in self._propose_listeners:
            fn(cmd)

    def barrier(self) -> Future:
        return self.propose(Barrier())

    def add_apply_listener(self, fn: Callable[[list], None],
                           loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._apply_listeners.append((fn, loop))

    def add_reset_listener(self, fn: Callable[[], None]) -> None:
        """Kept for the interface: nothing here ever replaces the whole state."""
        self._reset_listeners.append(fn)

    def add_propose_listener(self, fn: Callable[[Command], None]) -> None:
        self._propose_listeners.append(fn)

    def change_membership(self, action: str, raft_addr: str) -> Future:
        """Refused (request_denied) like pysyncobj when it would change nothing."""
        fut: Future = Future()
        with self._lock:
            outcome = self._scripted.popleft() if self._scripted else None
            if outcome is None and (action == "add") == (raft_addr in self._members):
                outcome = Outcome(Outcome.NOT_APPLIED, reason="request_denied")
            if outcome is None:
                if action == "add":
                    self._members.append(raft_addr)
                else:
                    self._members.remove(raft_addr)
                outcome = Outcome(Outcome.APPLIED)
                self._refresh_status()
        fut.set_result(outcome)
        return fut

    def request_snapshot(self) -> None:
        """Counted; there is no log to compact."""
        self.stats["snapshots"] += 1

    def stop(self) -> None:
        self.store.close()

    # -- applying ------------------------------------------------------------------------
    def _commit(self, cmd: Command, fut: Future | asyncio.Future) -> None:
        with self._lock:
            if self._scripted:
                deliver([], [], [(fut, self._scripted.popleft())])
                return
            index = self._index + 1
            result, published = apply_entry(self.store, cmd.encode(), index)
            self.store.commit()  # in this thread: an LMDB write transaction cannot move
            self._index = index
            self._refresh_status()
            deliver(published, self._apply_listeners, [(fut, Outcome(Outcome.APPLIED, result))])

    def _refresh_status(self) -> None:
        index = self._index
        self.status = {
            "id": self.config.id, "raft_addr": self.config.raft_addr, "state": "leader",
            "leader": self.config.raft_addr, "term": TERM, "commit_index": index,
            "applied_index": index, "log_entries": index, "has_quorum": True,
            "members": sorted(self._members), "leader_commit_index": index, "journal_syncs": 0,
            "leader_heard": None,  # it is the leader
        }
