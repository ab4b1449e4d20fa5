"""The real API app (api/server.py build_app) on the in-memory Raft, served by aiohttp's test
server on a loop thread: for API tests that need no replication. No replica processes,
no elections, nothing to wait for; the start-up proposals a replica makes (admin key,
cluster key, member record) are made, and answered, before the first request.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from aiohttp.test_utils import TestServer

from raftmesh.api import auth, server
from raftmesh.api.map_stream import HUB
from raftmesh.cluster.config import ReplicaConfig
from raftmesh.cluster.raft.in_memory import InMemoryRaft

STARTUP_TIMEOUT = 30.0


@dataclass
class ServedReplica:
    """What API tests read of a LocalCluster's replica."""
    id: str
    raft_addr: str
    api_url: str
    api_port: int


@dataclass
class InMemoryApi:
    """One replica's API on InMemoryRaft, shaped like the LocalCluster tests talk to."""
    raft: InMemoryRaft
    admin_key: str
    replicas: list[ServedReplica] = field(default_factory=list)


class ServedInMemory:
    """Context manager: start() the app on its own loop thread, close() everything."""

    def __init__(self, data_dir: str, **settings):
        """`settings`: ReplicaConfig fields beyond the defaults (e.g. single sign-on)."""
        self.admin_key = auth.new_secret_token("rmk")[1]
        config = ReplicaConfig(id="mem0", raft_addr="127.0.0.1:1", peers=[], data_dir=data_dir,
                               cluster_secret="in-memory-test-secret", bootstrap_admin_key=self.admin_key,
                               **settings)
        self.raft = InMemoryRaft(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="in-memory-api", daemon=True)
        self._server: TestServer | None = None

    def __enter__(self) -> InMemoryApi:
        self._thread.start()
        self._run(self._start())
        port = self._server.port
        self.raft.config.api_url = f"http://127.0.0.1:{port}"
        return InMemoryApi(self.raft, self.admin_key,
                           [ServedReplica(self.raft.config.id, self.raft.config.raft_addr,
                                         self.raft.config.api_url, port)])

    def __exit__(self, *exc) -> None:
        try:
            if self._server is not None:
                self._run(self._stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(STARTUP_TIMEOUT)
            self._loop.close()
            self.raft.stop()

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(STARTUP_TIMEOUT)

    async def _start(self) -> None:
        app = server.build_app(self.raft)
        self._server = TestServer(app, host="127.0.0.1")
        await self._server.start_server()
        app[HUB].start()
        await server.bootstrap_admin_key(self.raft)
        await server.bootstrap_cluster_key(self.raft)
        await server.announce(self.raft)

    async def _stop(self) -> None:
        await self._server.app[HUB].stop()
        await self._server.close()
