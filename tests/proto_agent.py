"""A protocol-exact test agent: registers like the daemon, reads and verifies every frame."""
from __future__ import annotations

import base64
import random
import time

from nacl.public import PrivateKey
from nacl.signing import SigningKey

from raftmesh.agent.control_client import ControlClient
from raftmesh.agent.map_client import MapStream
from raftmesh.agent.netmap_state import AgentNetmap
from raftmesh.agent.session import AgentSession
from raftmesh.proto.frames import FrameError
from raftmesh.proto.routes import REGISTER


class ProtoAgent:
    """Registers like the daemon and reads frames through the daemon's AgentSession,
    checking every signature; the test decides where and when to connect."""

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
        self.session = AgentSession(random.Random())
        self.session.registered(resp)
        self.stream: MapStream | None = None
        self.kinds: list[str] = []

    @property
    def view(self) -> AgentNetmap:
        return self.session.view

    def connect(self, replica: int | None = None, since="held") -> MapStream:
        if replica is not None:
            self.replica = replica
        since = self.session.since if since == "held" else since
        self.stream = MapStream(self.urls[self.replica], self.key, since)
        self.session.stream_opened(self.stream.nonce, self.stream.stream_keys, self.stream.keepalive,
                                   time.monotonic())
        return self.stream

    def pump(self, until, timeout: float = 15.0):
        """Apply frames until `until(self)` holds (or fail at the deadline); a frame that
        fails verification raises FrameError."""
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
            _action, verdict = self.session.frame(payload, time.monotonic(), time.time())
            if verdict is None:
                raise FrameError(self.session.end_reason)
            self.kinds.append(verdict.kind)
            if verdict.kind == "bye":
                self.bye = verdict.bye

    def peers(self) -> set[str]:
        return set(self.view.netmap.peers) if self.view.netmap else set()

    def close(self):
        if self.stream:
            self.stream.close()
