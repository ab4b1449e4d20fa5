"""Signed map-stream frames: made by every replica, checked by every agent.

A frame is signed by the cluster key in the replicated state, so an agent trusts what it
applies because the cluster signed it, not because of which replica, proxy or network
relayed it. Key rotation keeps agents connected: while the previous key is in its overlap
period, frames carry an endorsement (the new public key signed by the old key), and an
agent that pinned the old key pins the new one the first time it sees a frame signed by
it.

Only the first frame of a stream must carry a signature. An agent that sends an ephemeral
X25519 key with its map request (HEADER_STREAM_KEY) gets it back in that signed first frame,
with the replica's: both sides then derive a key for this stream (libsodium's key exchange),
and later frames carry a keyed BLAKE2b tag instead of an Ed25519 signature: about 2 µs per
frame against 33 µs to sign and 65 µs to verify, which at 10,000 agents is a CPU-second per
policy change (docs/benchmarks.md, propagation). The tag key is known to that replica and
that agent only, so a relay still cannot forge, and the frame's nonce and seq stay under the
tag. Pure functions and a byte-level reader; no sockets.
"""
from __future__ import annotations

import hmac
import json
import re
from dataclasses import dataclass
from typing import Any

from nacl.bindings import (crypto_kx_client_session_keys, crypto_kx_keypair,
                           crypto_kx_server_session_keys)
from nacl.exceptions import CryptoError
from nacl.signing import SigningKey

from raftmesh.proto.machine_auth import keyed_tag, sign_payload, unb64, verify_payload
from raftmesh.proto.wire import FRAME_KINDS, MAX_FRAME_BYTES, canonical_json, signed_part


class FrameError(ValueError):
    """A frame that must not be applied; the message says why."""


@dataclass(frozen=True)
class ClusterKey:
    id: str
    public_key: str
    private_key: str | None = None  # only replicas hold it


def endorsement_message(new: ClusterKey) -> bytes:
    return f"raftmesh-cluster-key\n{new.id}\n{new.public_key}".encode()


def endorse(old: ClusterKey, new: ClusterKey) -> dict[str, str]:
    """`old` vouches for `new`: lets agents that pinned `old` accept frames signed by `new`."""
    key = SigningKey(unb64(old.private_key, "private key", 32))
    return {"signed_by": old.id, "key_id": new.id, "public_key": new.public_key,
            "sig": sign_payload(key, endorsement_message(new))}


class FrameSigner:
    """Signs frames with one cluster key (the signing key object is built once)."""

    def __init__(self, key: ClusterKey, endorsements: list[dict] = ()):
        self.key_id = key.id
        self.endorsements = list(endorsements)
        self._signer = SigningKey(unb64(key.private_key, "private key", 32))

    def frame(self, kind: str, node_id: str, version: int, body: bytes, nonce: str,
              seq: int, key_exchange: dict[str, str] | None = None) -> bytes:
        """The length-prefixed bytes of one signed frame. `body` is the body's canonical
        JSON (encode_body). `nonce` is the one the agent signed its map request with, `seq`
        the frame's place in that stream (from 0): see AgentNetmap.begin_stream.
        `key_exchange` (key_exchange_offer) goes in a stream's first frame only."""
        frame: dict[str, Any] = {"kind": kind, "node_id": node_id, "version": version,
                                 "key_id": self.key_id, "nonce": nonce, "seq": seq}
        if self.endorsements:
            frame["endorsements"] = self.endorsements
        if key_exchange is not None:
            frame["key_exchange"] = key_exchange
        signed = _frame_text(frame, body)
        return _with_field(version, signed, "sig", sign_payload(self._signer, signed))


def next_frame(signer: FrameSigner, stream: Any, kind: str, version: int, body: bytes) -> bytes:
    """`stream`'s next frame (it has node_id, nonce, seq, tag_key, key_exchange, signed_by;
    see api/map_stream.Stream): tagged on a stream with a tag key whose last signed frame
    was signed with `signer`, else signed. So the first frame is signed (and carries the
    key exchange), and after a cluster key rotation one signed frame carries the
    endorsement: the agent pins the new key before the old one retires."""
    if stream.tag_key is not None and stream.signed_by is signer:
        data = tagged_frame(stream.tag_key, kind, stream.node_id, version, body,
                            stream.nonce, stream.seq)
    else:
        data = signer.frame(kind, stream.node_id, version, body, stream.nonce, stream.seq,
                            stream.key_exchange)
        stream.signed_by, stream.key_exchange = signer, None
    stream.seq += 1
    return data


def tagged_frame(tag_key: bytes, kind: str, node_id: str, version: int, body: bytes,
                 nonce: str, seq: int) -> bytes:
    """A frame of a stream whose first, signed frame set up `tag_key` (see the module doc):
    authenticated by its tag, not a signature. `body`: its canonical JSON (encode_body).
    The bulk of a replica's frames: their canonical JSON is formatted directly, members in
    sorted order, not encoded from a dict (a fifth of the cost)."""
    if type(version) is not int or type(seq) is not int:
        raise TypeError("a frame's version and seq must be ints")
    head = b'{"body":%s,"kind":%s,"node_id":%s,"nonce":%s,"seq":%d' % (
        body, _json_text(kind), _json_text(node_id), _json_text(nonce), seq)
    tag = keyed_tag(tag_key, b'%s,"version":%d}' % (head, version))
    data = b'%s,"tag":"%s","version":%d}' % (head, tag.encode(), version)
    return len(data).to_bytes(4, "little") + data


def _json_text(text: str) -> bytes:
    return json.dumps(text).encode()  # as canonical_json encodes a string


def encode_body(body: dict[str, Any]) -> bytes:
    """A frame body's canonical JSON. A replica encodes each distinct body once and every
    frame carrying it reuses the bytes: at 10,000 streams, encoding the body again per
    frame was most of a replica's CPU per delivered delta (docs/benchmarks.md)."""
    return canonical_json(body)


def _frame_text(members: dict[str, Any], body: bytes) -> bytes:
    """The canonical JSON of `members` plus "body": `body` (its canonical JSON). "body"
    sorts before every other member, so its bytes go first and only the small rest is
    encoded: the same bytes as encoding the whole frame."""
    return b'{"body":' + body + b"," + canonical_json(members)[1:]


def _with_field(version: int, text: bytes, name: str, value: str) -> bytes:
    """The length-prefixed bytes of the frame encoded as `text` with `name` added. `name`
    ("sig", "tag") sorts just before "version", the last member, so the value is spliced
    into `text` before it: the same bytes as encoding the frame again, for one JSON
    encoding fewer per frame."""
    if type(version) is not int:
        raise TypeError(f"a frame's version must be an int, not {type(version).__name__}")
    tail = b',"version":%d}' % version
    data = b"".join((text[:-len(tail)], b',"%s":"' % name.encode(), value.encode(), b'"', tail))
    return len(data).to_bytes(4, "little") + data


# -- stream keys ------------------------------------------------------------------------------
def stream_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair (public, secret): an agent's for one map request, a replica's
    for its streams. Random, so callers at the edge make it."""
    return crypto_kx_keypair()


def replica_tag_key(replica_keys: tuple[bytes, bytes], agent_public: bytes) -> bytes:
    """The key a replica tags one stream's frames with. Raises FrameError for a key that is
    not a usable X25519 public key."""
    try:
        _rx, tx = crypto_kx_server_session_keys(*replica_keys, agent_public)
    except (CryptoError, TypeError, ValueError) as e:
        raise FrameError(f"unusable stream key: {e}") from None
    return tx


def agent_tag_key(agent_keys: tuple[bytes, bytes], replica_public: bytes) -> bytes:
    """The key an agent checks its stream's tags with: the replica's replica_tag_key."""
    try:
        rx, _tx = crypto_kx_client_session_keys(*agent_keys, replica_public)
    except (CryptoError, TypeError, ValueError) as e:
        raise FrameError(f"unusable stream key from the replica: {e}") from None
    return rx


def key_exchange_offer(agent_public: bytes, replica_public: bytes) -> dict[str, str]:
    """What a stream's first, signed frame carries as `key_exchange`: both public keys, so
    the agent sees the replica answered its own key (a relay that swapped it is caught)."""
    return {"agent": agent_public.hex(), "replica": replica_public.hex()}


def accept_key_exchange(offer: Any, agent_keys: tuple[bytes, bytes] | None) -> bytes:
    """The tag key from a first frame's verified `key_exchange`; FrameError if the offer is
    not for this agent's key."""
    if agent_keys is None:
        raise FrameError("frame offers a stream key this agent did not ask for")
    if (not isinstance(offer, dict) or not isinstance(offer.get("agent"), str)
            or not isinstance(offer.get("replica"), str)):
        raise FrameError("malformed key_exchange")
    if offer["agent"] != agent_keys[0].hex():
        raise FrameError("key_exchange answers another agent key than this stream's")
    return agent_tag_key(agent_keys, stream_key_bytes(offer["replica"]))


def stream_key_bytes(text: str) -> bytes:
    """A stream public key from its hex text (FrameError if it is not 32 bytes of hex)."""
    if not isinstance(text, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise FrameError("a stream key must be 64 hex digits (32 bytes)")
    return bytes.fromhex(text)


def verify_frame(frame: Any, node_id: str, pinned: dict[str, str],
                 tag_key: bytes | None = None) -> dict[str, str]:
    """Check a decoded frame against the pinned cluster keys (id -> public key), or, for a
    tagged frame, against its stream's `tag_key`.

    Returns keys to pin in addition (a newly endorsed key), or raises FrameError.
    """
    if not isinstance(frame, dict) or frame.get("kind") not in FRAME_KINDS:
        raise FrameError("not a frame")
    if frame.get("node_id") != node_id:
        raise FrameError(f"frame is for node {frame.get('node_id')!r}, not this node")
    if not isinstance(frame.get("version"), int) or not isinstance(frame.get("body"), dict):
        raise FrameError("frame without integer version or object body")
    if not isinstance(frame.get("nonce"), str) or type(frame.get("seq")) is not int:
        raise FrameError("frame without its stream's nonce and sequence number")
    if "tag" in frame:
        tag = frame["tag"]
        if any(k in frame for k in ("sig", "key_id", "endorsements", "key_exchange")):
            raise FrameError("frame both tagged and signed")
        if tag_key is None:
            raise FrameError("tagged frame on a stream without a stream key")
        if not isinstance(tag, str) or not tag.isascii() or not hmac.compare_digest(
                keyed_tag(tag_key, signed_part(frame)), tag):
            raise FrameError("bad stream tag")
        return {}
    key_id, sig = frame.get("key_id"), frame.get("sig")
    if not isinstance(key_id, str) or not isinstance(sig, str):
        raise FrameError("unsigned frame")
    new_pins: dict[str, str] = {}
    public = pinned.get(key_id)
    if public is None:
        for e in frame.get("endorsements") or ():
            if (isinstance(e, dict) and e.get("key_id") == key_id and e.get("signed_by") in pinned
                    and isinstance(e.get("public_key"), str) and verify_payload(
                        [pinned[e["signed_by"]]],
                        endorsement_message(ClusterKey(key_id, e["public_key"])), e.get("sig", ""))):
                public = new_pins[key_id] = e["public_key"]
                break
        else:
            raise FrameError(f"signed by cluster key {key_id!r}, which is not pinned or endorsed")
    if not verify_payload([public], signed_part(frame), sig):
        raise FrameError("bad cluster signature")
    return new_pins


class FrameReader:
    """Splits a byte stream into decoded frames (4-byte little-endian length + JSON)."""

    def __init__(self, max_frame: int = MAX_FRAME_BYTES):
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            size = int.from_bytes(self._buf[:4], "little")
            if size > self.max_frame:
                raise FrameError(f"frame of {size} bytes exceeds {self.max_frame}")
            if len(self._buf) < 4 + size:
                break
            raw = bytes(self._buf[4:4 + size])
            del self._buf[:4 + size]
            try:
                out.append(json.loads(raw))
            except (ValueError, UnicodeDecodeError) as e:
                raise FrameError(f"frame is not JSON: {e}") from None
        return out

