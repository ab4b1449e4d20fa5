"""A registered agent's keys, a UDP socket playing its wireguard-go, and its RelayClient: the
relay tests' stand-in for an agent (tests/test_relay.py, tests/test_relay_links.py,
tests/test_haproxy.py)."""
from __future__ import annotations

import base64
import socket

from nacl.public import PrivateKey
from nacl.signing import SigningKey

from raftmesh.agent.control_client import ControlClient
from raftmesh.agent.relay import RelayClient
from raftmesh.proto.routes import REGISTER


class Machine:
    def __init__(self, url: str, auth_key: str, name: str, relay_urls: list[str] | None = None):
        """Registers at `url`; keeps its relay session on `relay_urls` (default: `url`)."""
        self.key = SigningKey.generate()
        self.wg_public = bytes(PrivateKey.generate().public_key)
        self.node_key = base64.b64encode(self.wg_public).decode()
        ControlClient([url], self.key).call(
            "POST", REGISTER, {"node_key": self.node_key, "hostname": name, "auth_key": auth_key})
        self.wg = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.wg.bind(("127.0.0.1", 0))
        self.wg.settimeout(5)
        self.relay = RelayClient(relay_urls or [url], self.key, self.wg.getsockname()[1], lambda: None)

    def send_to(self, peer: "Machine", packet: bytes) -> None:
        """As wireguard-go would: to the local endpoint standing for `peer`."""
        port = int(self.relay.endpoint_for(peer.node_key).rsplit(":", 1)[1])
        self.wg.sendto(packet, ("127.0.0.1", port))

    def close(self):
        self.relay.close()
        self.wg.close()
