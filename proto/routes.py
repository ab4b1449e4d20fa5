"""Where the agent protocol lives on a replica: paths, stream headers and `bye` codes.

Both sides name them from here, so a replica and an agent cannot disagree on a spelling.
The signing headers are in machine_auth.py, the stream key header in wire.py and the
version header in version.py.
"""
from __future__ import annotations

MACHINE = "/machine"
REGISTER = MACHINE + "/register"
REPORT = MACHINE + "/report"
ROTATE_KEY = MACHINE + "/rotate-key"
LOGOUT = MACHINE + "/logout"
MAP = MACHINE + "/map"
ACK = MACHINE + "/ack"
RELAY = MACHINE + "/relay"  # WebSocket: WireGuard packets to and from other agents (proto/relay.py)

# Response headers of a map stream: which replica serves it, its keepalive period (an
# agent gives up on a stream silent for twice that) and the UDP port of the replica's STUN
# responder (protocol version 2; on the stream's host, proto/stun.py).
HEADER_REPLICA = "X-Raftmesh-Replica"
HEADER_KEEPALIVE = "X-Raftmesh-Keepalive"
HEADER_STUN_PORT = "X-Raftmesh-Stun-Port"
HEADER_ACK_PORT = "X-Raftmesh-Ack-Port"  # UDP port taking ack datagrams (version 3, proto/ack_datagram.py)
DEFAULT_KEEPALIVE = 10.0  # assumed when a stream does not say


def udp_port(header: str | None) -> int | None:
    """The port a map stream's HEADER_STUN_PORT or HEADER_ACK_PORT names, None if absent
    or not a port (then the agent does without)."""
    if header is None or not header.isdigit() or not 0 < int(header) < 65536:
        return None
    return int(header)
FRAME_CONTENT_TYPE = "application/x-raftmesh-frames"

# The `code` of a `bye` frame's body. Revoked: the node left the mesh, the agent drops every
# peer and stops streaming. Shutting down: the replica is stopping, the agent fails over.
BYE_REVOKED = "revoked"
BYE_SHUTTING_DOWN = "shutting_down"
