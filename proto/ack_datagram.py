"""Acks as one UDP datagram to the replica's ack port (protocol version 3).

An HTTP ack (`POST /machine/ack`) per agent and change was two thirds of a replica's event
loop during a change, and half a light agent's CPU: parsing a request and writing a response
costs far more than the ack itself. A datagram carries the same body, tagged under the key
of the stream whose frames it acknowledges (machine_auth.request_key, as a tagged HTTP ack
is), to the port the map stream's response names (HEADER_ACK_PORT, the replica's STUN
socket). The replica answers each one it took with a confirmation; an agent that gets none
in time sends the ack over HTTP instead, so a lost datagram costs a delay, never the ack.

No timestamp or nonce: a replayed ack can only repeat what its stream's agent already
reported (acks only move an acked version forward), and the key dies with the stream. The
confirmation is not tagged: forging one can only make an agent skip its HTTP fallback, which
whoever can forge it could as well achieve by dropping the datagram.
"""
from __future__ import annotations

import hmac
import json

from .machine_auth import keyed_tag

ACK_MAGIC = b"RMAK"  # never a STUN message (whose first two bits are zero), never a relay frame
CONFIRM_MAGIC = b"RMOK"
TAG_BYTES = 24  # keyed_tag's base64 text
MAX_DATAGRAM = 1200  # fits every path's MTU; a body this size has room for 64 applied versions
CONFIRM_WAIT = 1.0  # seconds an agent waits for the confirmation before acking over HTTP


class AckDatagramError(ValueError):
    """Not a well-formed ack datagram."""


def encode_ack(stream_auth: tuple[str, bytes], body: dict) -> bytes:
    """The ack `body` (as POST /machine/ack takes it) for the stream `stream_auth` names
    (AgentNetmap.stream_auth: its nonce and request key); AckDatagramError if too large."""
    nonce, key = stream_auth
    payload = json.dumps({**body, "stream": nonce}, separators=(",", ":")).encode()
    data = ACK_MAGIC + keyed_tag(key, ACK_MAGIC + payload).encode() + payload
    if len(data) > MAX_DATAGRAM:
        raise AckDatagramError(f"an ack of {len(data)} bytes does not fit a datagram")
    return data


def decode_ack(data: bytes) -> tuple[str, dict, bytes, bytes]:
    """(stream nonce, ack body, tag, tagged payload): check the tag with `tag_matches` under
    the named stream's key before believing any of it."""
    if len(data) > MAX_DATAGRAM or not data.startswith(ACK_MAGIC):
        raise AckDatagramError("not an ack datagram")
    tag, payload = data[4:4 + TAG_BYTES], data[4 + TAG_BYTES:]
    try:
        body = json.loads(payload, parse_constant=_refuse)
    except (ValueError, UnicodeDecodeError):
        raise AckDatagramError("an ack datagram's body is not JSON") from None
    nonce = body.pop("stream", None) if isinstance(body, dict) else None
    if not isinstance(nonce, str):
        raise AckDatagramError("an ack datagram names no stream")
    return nonce, body, tag, ACK_MAGIC + payload


def _refuse(constant: str):
    raise ValueError(f"{constant} is not JSON")


def tag_matches(key: bytes, tag: bytes, payload: bytes) -> bool:
    return hmac.compare_digest(keyed_tag(key, payload).encode(), tag)


def encode_confirm(nonce: str, version: int) -> bytes:
    return CONFIRM_MAGIC + json.dumps([nonce, version], separators=(",", ":")).encode()


def decode_confirm(data: bytes) -> tuple[str, int] | None:
    """(stream nonce, acked version) of a confirmation, or None for anything else."""
    if not data.startswith(CONFIRM_MAGIC) or len(data) > MAX_DATAGRAM:
        return None
    try:
        nonce, version = json.loads(data[4:])
    except (ValueError, TypeError):
        return None
    return (nonce, version) if isinstance(nonce, str) and isinstance(version, int) else None
