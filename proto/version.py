"""The agent protocol's version: what an agent speaks and what a replica serves.

An agent names its version in HEADER_PROTOCOL_VERSION on every /machine/* request. A replica
that cannot serve it refuses the request with 426 `unsupported_protocol_version` (a message
naming the versions it serves) instead of answering in terms the agent would misread; the
agent reports the refusal and waits before trying again. A request without the header is
version 1: agents deployed before the header existed keep working.

Bump PROTOCOL_VERSION when a replica or an agent would misread the other's messages, record
what changed in HISTORY, and raise OLDEST_SERVED only once no agent older than it is left.
"""
from __future__ import annotations

from .numbers import NumberError, parse_number

PROTOCOL_VERSION = 3
OLDEST_SERVED = 1
HEADER_PROTOCOL_VERSION = "X-Raftmesh-Protocol"
UNSUPPORTED = "unsupported_protocol_version"  # the error code of a refusal

HISTORY = {
    1: ("2026-12-06", "requests signed with the machine key, or acks tagged under their "
        "stream's key; the map stream of length-prefixed JSON frames (full, delta, keepalive, "
        "bye), the first signed by the cluster key and carrying the stream key exchange, later "
        "ones tagged; resume with ?since; bye codes revoked and shutting_down; deferred, "
        "coalesced acks. Requests without the version header are taken as version 1."),
    2: ("2026-12-06", "map stream responses name the replica's STUN port (X-Raftmesh-Stun-Port); "
        "reported endpoints include STUN-mapped addresses, and agents probe peers' endpoints "
        "from their WireGuard port (agent/disco.py); a relay WebSocket at /machine/relay "
        "whose messages are a peer's key and a batch of length-prefixed WireGuard packets "
        "(proto/relay.py); acks may carry the agent's peer paths and connection setup times. "
        "Version-1 agents ignore all of it and are served as before."),
    3: ("2026-12-07", "map stream responses name a UDP port taking acks as datagrams "
        "(X-Raftmesh-Ack-Port, proto/ack_datagram.py): the ack body tagged under the stream's "
        "request key, confirmed by the replica; agents fall back to POST /machine/ack when no "
        "confirmation comes. Agents also send their candidates to peers over the relay session, "
        "in a box sealed like a probe (agent/disco.py, kind CANDIDATES), so a new STUN mapping "
        "is probed before a netmap delta brings it; replicas never look inside a relay batch. "
        "Older agents ignore the header and ack over HTTP as before; a version-2 agent hands a "
        "candidates message to wireguard-go, which drops it."),
}


class VersionError(ValueError):
    """A version header a replica cannot serve; `malformed` if it is not a version at all."""

    def __init__(self, message: str, malformed: bool = False):
        super().__init__(message)
        self.malformed = malformed


def requested_version(header: str | None) -> int:
    """The version an agent's request names (1 without the header), or VersionError."""
    if header is None:
        return 1
    try:
        version = parse_number(header, HEADER_PROTOCOL_VERSION, minimum=0, maximum=999_999)
    except NumberError as e:
        raise VersionError(str(e), malformed=True) from None
    if not OLDEST_SERVED <= version <= PROTOCOL_VERSION:
        served = (f"version {PROTOCOL_VERSION}" if OLDEST_SERVED == PROTOCOL_VERSION
                  else f"versions {OLDEST_SERVED} to {PROTOCOL_VERSION}")
        fix = "upgrade the agent" if version < OLDEST_SERVED else "upgrade the replicas or use an older agent"
        raise VersionError(f"this replica serves agent protocol {served}, not {version}: {fix}")
    return version


def version_header() -> dict[str, str]:
    """The header an agent sends with every request."""
    return {HEADER_PROTOCOL_VERSION: str(PROTOCOL_VERSION)}
