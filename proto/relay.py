"""The relay's frames, shared by the replica (api/relay.py) and the agent (agent/relay.py).

One WebSocket binary message is a peer's raw 32-byte WireGuard public key followed by one
WireGuard packet: to the replica, the key names the destination; from the replica, the
sender. Nothing else travels on a relay session.
"""
from __future__ import annotations

KEY_BYTES = 32
MAX_PACKET_BYTES = 2048  # WireGuard's packets stay below the path MTU (1420 + headers)
MAX_FRAME_BYTES = KEY_BYTES + MAX_PACKET_BYTES


class RelayFrameError(ValueError):
    """A frame that is not a key and a packet of bounded size."""


def split_frame(data: bytes) -> tuple[bytes, bytes]:
    if len(data) > MAX_FRAME_BYTES:
        raise RelayFrameError(f"frame of {len(data)} bytes, more than {MAX_FRAME_BYTES}")
    if len(data) <= KEY_BYTES:
        raise RelayFrameError("frame without a packet")
    return data[:KEY_BYTES], data[KEY_BYTES:]
