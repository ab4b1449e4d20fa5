"""The agent's view of its netmap: verified frames in, the netmap to enforce out.

Pure (the caller passes time), so the rules that keep an agent safe are unit-tested:
- a frame is applied only if the cluster signed it (pinned key, or endorsed by one), or
  tagged it with the key its stream's signed first frame set up, for this stream, in order
  (begin_stream);
- a version older than the one held is never applied, whichever replica sent it;
- key expiry is enforced by local time even when no replica is reachable: an expired peer
  is dropped, and an expired self has no peers at all;
- a netmap older than `max_stale` seconds without contact is no longer enforced.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from raftmesh.proto.frames import FrameError, accept_key_exchange, verify_frame
from raftmesh.proto.machine_auth import request_key
from raftmesh.proto.wire import Netmap, NetmapDelta, apply_delta


@dataclass
class Verdict:
    """What one frame meant: a new netmap to apply, a keepalive, or the end of the stream."""

    kind: str
    netmap: Netmap | None = None
    version: int = 0
    bye: dict | None = None
    new_keys: dict[str, str] = field(default_factory=dict)


class AgentNetmap:
    def __init__(self, node_id: str, pinned: dict[str, str], netmap: Netmap | None = None):
        self.node_id = node_id
        self.pinned = dict(pinned)
        self.netmap = netmap
        self._stream: str | None = None  # the nonce of the map request being answered
        self._next_seq = 0
        self._stream_keys: tuple[bytes, bytes] | None = None  # this stream's X25519 pair
        self._tag_key: bytes | None = None  # set up by the stream's signed first frame

    @property
    def version(self) -> int | None:
        return self.netmap.version if self.netmap else None

    @property
    def stream_auth(self) -> tuple[str, bytes] | None:
        """(stream nonce, request key) to tag requests to this stream's replica with
        (machine_auth.tag_headers), once its first frame set up a key; else None: sign."""
        if self._tag_key is None:
            return None
        return self._stream, request_key(self._tag_key)

    def begin_stream(self, nonce: str, stream_keys: tuple[bytes, bytes] | None = None) -> None:
        """Accept only this stream's frames from now on, in order: signed with the nonce the
        agent signed its map request with, numbered from 0. Otherwise whoever relays the
        stream (a proxy, the network) could replay an earlier stream's frames: a keepalive
        replayed to an agent cut off from the cluster would keep it "connected" to a frozen
        netmap, never failing over nor going stale, with revoked peers kept. Within a
        stream, a dropped, repeated or reordered frame shows as a gap in `seq`.

        `stream_keys`: the X25519 pair whose public half the map request sent
        (HEADER_STREAM_KEY); the first frame then sets up the key later frames are tagged
        with (proto/frames.py)."""
        self._stream, self._next_seq = nonce, 0
        self._stream_keys, self._tag_key = stream_keys, None

    def accept(self, frame: dict) -> Verdict:
        """Verify and apply one decoded frame; raises FrameError for anything not applicable."""
        new_keys = verify_frame(frame, self.node_id, self.pinned, self._tag_key)
        if self._stream is None or frame["nonce"] != self._stream:
            raise FrameError("frame signed for another map request than this stream's "
                             "(replayed, or no stream begun)")
        if frame["seq"] != self._next_seq:
            raise FrameError(f"frame {frame['seq']} of this stream where {self._next_seq} was "
                             "due: frames were dropped, repeated or reordered")
        if "key_exchange" in frame:
            if frame["seq"] != 0:
                raise FrameError("key_exchange after a stream's first frame")
            self._tag_key = accept_key_exchange(frame["key_exchange"], self._stream_keys)
        self._next_seq += 1
        self.pinned.update(new_keys)
        kind, version, body = frame["kind"], frame["version"], frame["body"]
        if kind in ("keepalive", "bye"):
            return Verdict(kind, version=version, bye=body if kind == "bye" else None,
                           new_keys=new_keys)
        try:
            if kind == "full":
                candidate = Netmap.from_json(body)
            else:
                if self.netmap is None:
                    raise FrameError("a delta arrived before any full netmap")
                candidate = apply_delta(self.netmap, NetmapDelta.from_json(body))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FrameError(f"malformed {kind} body: {e!r}") from None
        if candidate.version != version:
            raise FrameError(f"frame version {version} does not match its body's {candidate.version}")
        if self.netmap is not None and version < self.netmap.version:
            return Verdict("stale", version=version, new_keys=new_keys)  # never go back
        self.netmap = candidate
        return Verdict(kind, candidate, version, new_keys=new_keys)


def effective(netmap: Netmap | None, now: float, last_contact: float | None,
              max_stale: float) -> Netmap | None:
    """The netmap to enforce at `now`: expired peers (or everyone, if our own key expired)
    and, beyond `max_stale` seconds without a verified frame, all peers are dropped."""
    if netmap is None:
        return None
    me = netmap.self_node
    cut = (me.key_expiry is not None and me.key_expiry <= now) or (
        max_stale > 0 and last_contact is not None and now - last_contact > max_stale)
    peers = {} if cut else {k: p for k, p in netmap.peers.items()
                            if p.key_expiry is None or p.key_expiry > now}
    if peers == netmap.peers:
        return netmap
    return Netmap(netmap.version, me, peers, () if cut else netmap.packet_filter, netmap.dns)


def next_expiry(netmap: Netmap | None, now: float) -> float | None:
    """When `effective` will next change because a key expires."""
    if netmap is None:
        return None
    times = [p.key_expiry for p in (netmap.self_node, *netmap.peers.values())
             if p.key_expiry is not None and p.key_expiry > now]
    return min(times, default=None)
