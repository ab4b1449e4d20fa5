"""A protocol-exact test agent: registers like the daemon, reads and verifies every frame."""
from __future__ import annotations

import base64
import time

from nacl.public import PrivateKey
from nacl.signing import SigningKey

from raftmesh.agent.control_client import ControlClient
from raftmesh.agent.map_client import MapStream
from raftmesh.agent.netmap_state import AgentNetmap
from raftmesh.proto.routes import REGISTER


class ProtoAgent:
    """Registers like the daemon and reads frames, checking every signature."""

    def __init__(self, cluster, user_key: str, hostname: str, replica: int = 0,
                 urls: list[str] | None = None):
        self.cluster = cluster
        self.urls = urls or [r.api_url for r in cluster.replicas]
        self.key = SigningKey.generate()
        self.replica = replica
        self.client = ControlClient(self.urls, self.key)
        self.client.current = replica
        node_key = base64.b64encode(bytes(PrivateKey.generate().public_key)).decode()
        resp = self.client.call("POST", REGISTER,
                                {"node_key": node_key, "hostname": hostname, "auth_key": user_key})
        self.node_id = resp["node"]["id"]
        self.ipv4 = resp["node"]["ipv4"]
        self.view = AgentNetmap(self.node_id, {k["id"]: k["public_key"] for k in resp["cluster_keys"]})
        self.stream: MapStream | None = None
        self.kinds: list[str] = []

    def connect(self, replica: int | None = None, since="held") -> MapStream:
        if replica is not None:
            self.replica = replica
        since = self.view.version if since == "held" else since
        self.stream = MapStream(self.urls[self.replica], self.key, since)
        self.view.begin_stream(self.stream.nonce, self.stream.stream_keys)
        return self.stream

    def pump(self, until, timeout: float = 15.0):
        """Apply frames until `until(self)` holds (or fail at the deadline)."""
        deadline = time.monotonic() + timeout
        while not until(self):
            left = deadline - time.monotonic()
            assert left > 0, f"condition not met; frames seen {self.kinds[-10:]}"
            item = self.stream.next(timeout=min(left, 1.0))
            if item is None:
                continue
            kind, payload = item
            if kind != "frame":
                self.kinds.append(kind)
                continue
            verdict = self.view.accept(payload)
            self.kinds.append(verdict.kind)
            if verdict.kind == "bye":
                self.bye = verdict.bye

    def peers(self) -> set[str]:
        return set(self.view.netmap.peers) if self.view.netmap else set()

    def close(self):
        if self.stream:
            self.stream.close()
