"""STUN binding requests and answers (RFC 5389), the part of STUN raftmesh uses.

Every replica answers binding requests on UDP (api/stun_server.py) so an agent learns how
its WireGuard port looks from outside its NAT; agents may also ask other STUN servers. The
codec is aioice's; this module only bounds what is accepted. A replica answers only a
well-formed binding request of at most MAX_REQUEST_BYTES with exactly one packet of at most
MAX_ANSWER_BYTES (the header and the mapped address: little to amplify) and keeps no state.

aioice is imported on first use (`codec`): it brings its ICE stack and dnspython, ~0.4 s of
an agent's start on a loaded machine, which the agent's prober thread spends while the
daemon registers.
"""
from __future__ import annotations

import ipaddress
import os
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aioice import stun

MAX_REQUEST_BYTES = 548  # RFC 5389 7.1: what a request without path MTU discovery may be
MAX_ANSWER_BYTES = 44  # 20-byte header, XOR-MAPPED-ADDRESS of an IPv6 source
COOKIE = bytes.fromhex("2112a442")  # RFC 5389 6: the magic cookie
HEADER_BYTES = 20


def codec():
    """aioice's STUN module."""
    from aioice import stun
    return stun


class StunError(ValueError):
    """A packet that is not a usable STUN message; the message says what is wrong."""


def _parse(data: bytes) -> stun.Message:
    if len(data) > MAX_REQUEST_BYTES:
        raise StunError(f"{len(data)} bytes, more than {MAX_REQUEST_BYTES}")
    if len(data) < HEADER_BYTES or data[4:8] != COOKIE:
        raise StunError("no STUN header (magic cookie missing)")
    try:
        return codec().parse_message(data)
    except (ValueError, KeyError, IndexError, struct.error) as e:
        raise StunError(f"malformed STUN message: {e}") from None


def new_transaction_id() -> bytes:
    return os.urandom(12)


def binding_request(transaction_id: bytes) -> bytes:
    stun = codec()
    return bytes(stun.Message(stun.Method.BINDING, stun.Class.REQUEST, transaction_id))


def answer(data: bytes, source: tuple[str, int]) -> bytes:
    """The binding success response telling `source` its address as seen here."""
    msg, stun = _parse(data), codec()
    if (msg.message_method, msg.message_class) != (stun.Method.BINDING, stun.Class.REQUEST):
        raise StunError("not a binding request")
    reply = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE, msg.transaction_id)
    reply.attributes["XOR-MAPPED-ADDRESS"] = (source[0], source[1])
    return bytes(reply)


def mapped_address(data: bytes, transaction_id: bytes) -> str:
    """`ip:port` from the binding response to our request `transaction_id`."""
    msg, stun = _parse(data), codec()
    if msg.transaction_id != transaction_id:
        raise StunError("answer to another transaction")
    if (msg.message_method, msg.message_class) != (stun.Method.BINDING, stun.Class.RESPONSE):
        raise StunError("not a binding success response")
    addr = msg.attributes.get("XOR-MAPPED-ADDRESS") or msg.attributes.get("MAPPED-ADDRESS")
    if not addr:
        raise StunError("binding response without a mapped address")
    ip = ipaddress.ip_address(addr[0])
    return f"[{ip}]:{addr[1]}" if ip.version == 6 else f"{ip}:{addr[1]}"
