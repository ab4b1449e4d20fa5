"""The relay's frames, shared by the replica (api/relay.py) and the agent (agent/relay.py).

One WebSocket binary message is a peer's raw 32-byte WireGuard public key followed by a
batch: one or more WireGuard packets, each after its length (2 bytes, big-endian). To the
replica the key names the destination; from the replica, the sender. The replica passes the
batch on without looking inside it; only the receiving agent splits it. Batching is what lets
the relay keep up: the work per message (framing and masking, the replica's routing, event
loop wake-ups on three processes) is paid once per batch, not once per packet, and a batch
only grows while the sender is busy, so a lone packet is never held back. Nothing else
travels on a relay session.
"""
from __future__ import annotations

import struct

KEY_BYTES = 32
MAX_PACKET_BYTES = 2048  # WireGuard's packets stay below the path MTU (1420 + headers)
MAX_BATCH_BYTES = 64 * 1024  # a batch's packets and their lengths
MAX_FRAME_BYTES = KEY_BYTES + MAX_BATCH_BYTES
_LENGTH = struct.Struct("!H")


class RelayFrameError(ValueError):
    """A frame that is not a key and a batch of bounded size."""


def split_frame(data: bytes) -> tuple[bytes, bytes]:
    """(key, batch) of a frame whose size is within bounds; the batch is not parsed."""
    if len(data) > MAX_FRAME_BYTES:
        raise RelayFrameError(f"frame of {len(data)} bytes, more than {MAX_FRAME_BYTES}")
    if len(data) <= KEY_BYTES:
        raise RelayFrameError("frame without a packet")
    return data[:KEY_BYTES], data[KEY_BYTES:]


def frames(key: bytes, packets: list[bytes]) -> list[bytes]:
    """The frames carrying `packets` (each at most MAX_PACKET_BYTES) to or from `key`."""
    out, parts, size = [], [key], 0
    for packet in packets:
        if size + _LENGTH.size + len(packet) > MAX_BATCH_BYTES:
            out.append(b"".join(parts))
            parts, size = [key], 0
        parts += (_LENGTH.pack(len(packet)), packet)
        size += _LENGTH.size + len(packet)
    if size:
        out.append(b"".join(parts))
    return out


def packets(batch: bytes) -> list[memoryview]:
    """The packets of a batch (views into it, not copies), or RelayFrameError naming what is
    wrong with it."""
    out, at, end = [], 0, len(batch)
    view = memoryview(batch)
    while at < end:
        if at + _LENGTH.size > end:
            raise RelayFrameError("batch ends inside a packet's length")
        (n,) = _LENGTH.unpack_from(batch, at)
        at += _LENGTH.size
        if n == 0 or n > MAX_PACKET_BYTES or at + n > end:
            raise RelayFrameError(f"packet of {n} bytes at offset {at} of a {end}-byte batch")
        out.append(view[at:at + n])
        at += n
    return out
