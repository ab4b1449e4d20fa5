"""Raft, as the rest of raftmesh sees it: one narrow interface and how proposals end.

This package is the adapter around pysyncobj 0.3.17. Every use of pysyncobj's private
members and every patch of its module globals lives here (pysyncobj_replica.py and the
modules it installs), so an upgrade or a replacement touches this package only;
tests/test_raft_adapter.py keeps it so. storage/journal.py implements pysyncobj's public
Journal interface and is the one other module that imports pysyncobj.

`start(config)` gives the real replica; in_memory.py gives a deterministic single-process
implementation of the same interface for tests of what sits above Raft (the API).
"""
from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import TYPE_CHECKING, Callable, Protocol

from raftmesh.storage.state_store import StateStore

if TYPE_CHECKING:
    from raftmesh.cluster.commands import Command
    from raftmesh.cluster.config import ReplicaConfig


class Outcome:
    """How a proposal ended: applied (with result), definitely not applied, or unknown."""

    APPLIED, NOT_APPLIED, UNKNOWN = "applied", "not_applied", "unknown"

    def __init__(self, kind: str, result: dict | None = None, reason: str = ""):
        self.kind, self.result, self.reason = kind, result, reason


class Raft(Protocol):
    """One replica of the replicated state machine (cluster/state_machine.py over `store`).

    Futures yield an Outcome. A caller that gives up waiting must report the outcome as
    unknown: the entry may still commit later.
    """

    config: ReplicaConfig
    store: StateStore  # what committed commands are applied into; read it freely
    # A copy refreshed by the Raft thread: id, raft_addr, state ("leader", "follower",
    # "candidate"), leader, term, commit_index, applied_index, log_entries, has_quorum,
    # members (raft addresses), leader_commit_index, journal_syncs, leader_heard (the
    # time.monotonic() of the leader's last message; None without one). Empty until it runs.
    status: dict
    stats: dict  # snapshots, snapshot_seconds, snapshot_installs, slow_ticks (counters)

    def propose(self, cmd: Command) -> Future:
        """Submit through Raft from any thread."""

    def propose_async(self, cmd: Command) -> asyncio.Future:
        """propose() for a caller on a running asyncio loop, settled on that loop."""

    def barrier(self) -> Future:
        """Read index: completes (result {"version": ...}) once everything committed before
        this call is applied here."""

    def add_apply_listener(self, fn: Callable[[list], None],
                           loop: asyncio.AbstractEventLoop | None = None) -> None:
        """`fn(batch)` with the applied batch [(index, command, result)], before the futures
        of that batch resolve: on the Raft thread, or on `loop`, queued ahead of them."""

    def add_reset_listener(self, fn: Callable[[], None]) -> None:
        """`fn()` after a snapshot replaced the whole state (batches were skipped)."""

    def add_propose_listener(self, fn: Callable[[Command], None]) -> None:
        """`fn(cmd)` for each command this replica proposes, on the proposing thread, before
        it is submitted."""

    def change_membership(self, action: str, raft_addr: str) -> Future:
        """Add ("add") or remove ("remove") a replica by Raft address."""

    def request_snapshot(self) -> None:
        """Snapshot and compact the log soon (not waited for)."""

    def stop(self) -> None:
        """Stop replicating and close the store."""


def start(config: ReplicaConfig) -> Raft:
    """The real replica for `config`, running (pysyncobj is imported only here)."""
    from .pysyncobj_replica import RaftReplica
    return RaftReplica(config)
