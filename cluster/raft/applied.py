"""What every Raft implementation does with committed entries, so they cannot drift apart:
apply each into the store, then hand the batch to listeners and settle its futures."""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future
from typing import Callable

from raftmesh.cluster import state_machine
from raftmesh.cluster.commands import Command, CommandError, NodeRegisterBatch
from raftmesh.storage.state_store import StateStore

from . import Outcome

log = logging.getLogger("raftmesh.replica")

ApplyListener = tuple[Callable[[list], None], "asyncio.AbstractEventLoop | None"]  # fn, its loop


def apply_entry(store: StateStore, payload: bytes,
                index: int) -> tuple[dict, list[tuple[int, Command, dict]]]:
    """Apply one entry at Raft `index` into the store's open batch (the caller commits it
    once per batch); an entry that does not decode is answered, not applied. Returns the
    result and the items apply listeners get: none for undecodable entries and read
    barriers (they change nothing anything is derived from), one per registration of a
    batch (listeners see each as if it had been its own entry at `index`)."""
    txn = store.write_txn()
    try:
        cmd = Command.decode(payload)
        result = state_machine.apply(txn, cmd, index)
    except CommandError as e:
        cmd, result = None, {"ok": False, "version": index, "code": "bad_command",
                             "message": str(e), "status": 400}
    store.set_applied_version(txn, index)
    if cmd is None or cmd.read_barrier:
        return result, []
    if isinstance(cmd, NodeRegisterBatch) and result["ok"]:
        return result, [(index, r, res) for r, res in
                        zip(cmd.registrations, result["value"]["results"])]
    return result, [(index, cmd, result)]


def deliver(batch: list, listeners: list[ApplyListener], settled: list[tuple[Future, Outcome]]) -> None:
    """After the batch's LMDB commit: listeners without a loop now, then each loop's
    listeners and futures in one callback on that loop (one wake-up of the loop instead of
    two: waking another thread while holding the GIL showed up at ~2% of write CPU), then
    the other futures. Work a listener hands to a loop is so queued ahead of any caller
    woken by those futures."""
    by_loop: dict[asyncio.AbstractEventLoop, tuple[list, list]] = {}  # listeners, futures
    if batch:
        for fn, loop in listeners:
            if loop is not None:
                by_loop.setdefault(loop, ([], []))[0].append(fn)
                continue
            try:
                fn(batch)
            except Exception:
                log.exception("apply listener failed")
    direct = []
    for fut, outcome in settled:
        if isinstance(fut, asyncio.Future):
            by_loop.setdefault(fut.get_loop(), ([], []))[1].append((fut, outcome))
        else:
            direct.append((fut, outcome))
    for loop, (on_loop, on_loop_settled) in by_loop.items():
        try:
            loop.call_soon_threadsafe(_on_loop, on_loop, batch, on_loop_settled)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more
    for fut, outcome in direct:  # after the loops' listeners are queued (see above)
        if not fut.done():
            fut.set_result(outcome)


def _on_loop(listeners: list, batch: list, settled: list) -> None:
    """On a loop, once per batch: its apply listeners, then the futures the batch settled."""
    for fn in listeners:
        try:
            fn(batch)
        except Exception:
            log.exception("apply listener failed")
    for fut, outcome in settled:
        if not fut.done():  # done: cancelled, its caller gave up
            fut.set_result(outcome)
