"""Group commit of registrations on one replica: the ones that arrive within one turn of
the event loop go through Raft as one node.register_batch entry.

Each Raft entry costs its own log append, replication, apply wake-up and future on every
replica, about as much as the registration's own work; a fleet starting up registers
hundreds at once. A registration waits for no other (the batch leaves at the end of the
turn it started), a lone one stays an ordinary node.register entry, and each caller gets
its own registration's result, as if it had been proposed alone. Until every member's release
applies node.register_batch (api/command_gate.py), each registration is its own entry.
"""
from __future__ import annotations

import asyncio
from typing import Callable

from aiohttp import web

from raftmesh.cluster.commands import NodeRegister, NodeRegisterBatch
from raftmesh.cluster.raft import Outcome, Raft


class RegistrationBatcher:
    def __init__(self, replica: Raft, limit: int, may_batch: Callable[[], bool]):
        self.replica, self.limit = replica, limit  # ReplicaConfig.register_batch
        self.may_batch = may_batch
        self._waiting: list[tuple[NodeRegister, asyncio.Future]] = []

    def propose(self, cmd: NodeRegister) -> asyncio.Future:
        """Like Raft.propose_async(cmd): a future of the Outcome of this registration."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiting.append((cmd, fut))
        if len(self._waiting) >= self.limit:
            self._send()
        elif len(self._waiting) == 1:
            loop.call_soon(self._send)
        return fut

    def _send(self) -> None:
        waiting, self._waiting = self._waiting, []
        if len(waiting) == 1 or (waiting and not self.may_batch()):
            for cmd, fut in waiting:
                _chain(self.replica.propose_async(cmd), fut)
        elif waiting:
            batch = NodeRegisterBatch(commands=[cmd.record() for cmd, _ in waiting],
                                      time=max(cmd.time for cmd, _ in waiting))
            self.replica.propose_async(batch).add_done_callback(
                lambda done: _settle(done, [fut for _, fut in waiting]))


def _chain(source: asyncio.Future, fut: asyncio.Future) -> None:
    source.add_done_callback(lambda done: fut.done() or fut.set_result(done.result()))


def _settle(done: asyncio.Future, futs: list[asyncio.Future]) -> None:
    """Each registration's own outcome: its result within the batch's, or the batch's fate."""
    outcome: Outcome = done.result()
    results = outcome.result["value"]["results"] if outcome.kind == Outcome.APPLIED and \
        outcome.result.get("ok") else None
    for i, fut in enumerate(futs):
        if fut.done():  # its caller gave up waiting (write deadline)
            continue
        if results is None:
            fut.set_result(outcome)
        else:
            fut.set_result(Outcome(Outcome.APPLIED, results[i]))


REGISTRATIONS = web.AppKey("registrations", RegistrationBatcher)
