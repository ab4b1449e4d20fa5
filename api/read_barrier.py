"""Finding a record a client just made through another replica."""
from __future__ import annotations

import asyncio
from typing import Callable

from raftmesh.cluster.raft import Outcome, Raft

from .errors import APIError


async def applied_or_after_barrier(replica: Raft, lookup: Callable[[], dict | None],
                                   what: str) -> dict | None:
    """`lookup()`; if it finds nothing, again behind a read barrier: the record may have been
    created a moment ago through another replica that this one (lagging, or just re-added)
    has not applied yet. 503 when the leader cannot be reached to tell."""
    record = lookup()
    if record is not None:
        return record
    try:
        outcome = await asyncio.wait_for(asyncio.wrap_future(replica.barrier()),
                                         replica.config.write_timeout)
    except asyncio.TimeoutError:
        outcome = None
    if outcome is None or outcome.kind != Outcome.APPLIED:
        raise APIError(503, "not_ready", f"{what} not known to this replica, which cannot "
                       "reach the leader to check it now; retry or use another replica")
    return lookup()
