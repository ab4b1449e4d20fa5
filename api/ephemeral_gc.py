"""The leader's side of removing ephemeral nodes: find the due ones, propose their removal.

The decision itself is replicated (cluster/lifecycle.py re-checks every id when applying),
so a follower that still thinks it leads, or two leaders in a term change, remove nothing
twice and nothing that came back online.
"""
from __future__ import annotations

import asyncio
import logging
import time

from raftmesh.cluster import lifecycle
from raftmesh.cluster.commands import NodeRemoveEphemeral
from raftmesh.cluster.raft import Raft

log = logging.getLogger("raftmesh.ephemeral")
MIN_PERIOD, MAX_PERIOD = 1.0, 10.0  # seconds between looks, a tenth of the limit within these


async def remove_ephemeral_nodes(replica: Raft) -> None:
    while True:
        with replica.store.read() as txn:
            limit = lifecycle.stored_settings(txn)["ephemeral_offline_seconds"]
            due = []
            if replica.status.get("state") == "leader":
                due = lifecycle.due_ephemeral((n for _, n in txn.items("nodes")), limit,
                                              time.time())
        if due:
            fut = replica.propose(NodeRemoveEphemeral(
                ids=due, time=time.time(), actor=f"replica:{replica.config.id}"))
            try:
                await asyncio.wait_for(asyncio.wrap_future(fut), 5)
            except asyncio.TimeoutError:
                log.info("removing %d ephemeral nodes timed out; trying again", len(due))
        # a periodic timer, not synchronisation
        await asyncio.sleep(min(MAX_PERIOD, max(MIN_PERIOD, limit / 10)))
