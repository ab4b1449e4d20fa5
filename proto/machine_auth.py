"""Agent request signatures: proof of the machine key on every request, no bearer secret.

An agent signs `method, path, timestamp, nonce, sha256(body)` with its Ed25519 machine key.
A replica accepts a signature within a freshness window and remembers nonces for that
window, so a captured request cannot be replayed to the same replica, and a proxy, a log or
a replica that sees the request learns nothing it could use later.

An agent's acks may instead carry a keyed BLAKE2b tag under a key derived from its open map
stream's (proto/frames.py): only that agent and the replica serving the stream know it, and
checking such a request takes ~7 µs where a signed one takes ~116. At 10,000 agents, acks
were a quarter of a replica's CPU during a policy change (docs/agents.md). Pure functions
plus a small nonce cache; the caller supplies the clock.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections import OrderedDict
from typing import Callable

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from raftmesh.proto.numbers import NumberError, parse_number

FRESHNESS_SECONDS = 30.0
HEADER_KEY = "X-Raftmesh-Machine"
HEADER_TIME = "X-Raftmesh-Time"
HEADER_NONCE = "X-Raftmesh-Nonce"
HEADER_SIG = "X-Raftmesh-Signature"
HEADER_STREAM = "X-Raftmesh-Stream"  # the nonce of the map request whose stream's key tags it
HEADER_STREAM_TAG = "X-Raftmesh-Stream-Tag"


class SignatureError(ValueError):
    """The request does not prove possession of the machine key; message says why."""


class StaleTimestamp(SignatureError):
    """The signed time is outside the freshness window: the agent's clock or this one's is off."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str, what: str, size: int | None = None) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise SignatureError(f"{what} is not valid base64")
    if size is not None and len(raw) != size:
        raise SignatureError(f"{what} must be {size} bytes, got {len(raw)}")
    return raw


def signed_message(method: str, path: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    return "\n".join([method.upper(), path, timestamp, nonce,
                      hashlib.sha256(body).hexdigest()]).encode()


def sign_headers(key: SigningKey, method: str, path: str, body: bytes, now: float, nonce: str) -> dict:
    timestamp = f"{now:.3f}"
    sig = key.sign(signed_message(method, path, timestamp, nonce, body)).signature
    return {HEADER_KEY: b64(bytes(key.verify_key)), HEADER_TIME: timestamp,
            HEADER_NONCE: nonce, HEADER_SIG: b64(sig)}


def keyed_tag(key: bytes, data: bytes) -> str:
    """A 16-byte keyed BLAKE2b of `data`, base64: frame tags and stream-tagged requests."""
    return b64(hashlib.blake2b(data, key=key, digest_size=16).digest())


def request_key(tag_key: bytes) -> bytes:
    """The key an agent tags requests to its stream's replica with: derived from the key of
    the stream's frame tags, so that each direction has its own."""
    return hashlib.blake2b(b"raftmesh-stream-requests", key=tag_key, digest_size=32).digest()


def tag_headers(key: bytes, stream_nonce: str, machine: str, method: str, path: str, body: bytes,
                now: float, nonce: str) -> dict:
    """Headers for a request tagged under `key` (request_key of the stream opened with
    `stream_nonce`) instead of signed; `machine` is the base64 machine public key."""
    timestamp = f"{now:.3f}"
    return {HEADER_KEY: machine, HEADER_TIME: timestamp, HEADER_NONCE: nonce,
            HEADER_STREAM: stream_nonce,
            HEADER_STREAM_TAG: keyed_tag(key, signed_message(method, path, timestamp, nonce, body))}


class NonceCache:
    """Nonces seen within the freshness window, oldest evicted first."""

    def __init__(self, window: float = FRESHNESS_SECONDS, limit: int = 200_000):
        self.window, self.limit = window, limit
        self._seen: OrderedDict[str, float] = OrderedDict()

    def check_and_add(self, key: str, now: float) -> bool:
        while self._seen and (next(iter(self._seen.values())) < now - self.window
                              or len(self._seen) > self.limit):
            self._seen.popitem(last=False)
        if key in self._seen:
            return False
        self._seen[key] = now
        return True


def verify_headers(headers, method: str, path: str, body: bytes, now: float,
                   nonces: NonceCache,
                   stream_key: Callable[[str, str], bytes | None] | None = None) -> str:
    """Return the base64 machine public key the request proves, or raise SignatureError.

    With `stream_key` ((machine, stream nonce) -> that open stream's request_key, or None),
    the request may be tagged instead of signed (tag_headers)."""
    tagged = HEADER_STREAM_TAG in headers
    if tagged and stream_key is None:
        raise SignatureError("this request must be signed with the machine key, not tagged")
    needed = (HEADER_STREAM, HEADER_STREAM_TAG) if tagged else (HEADER_SIG,)
    missing = [h for h in (HEADER_KEY, HEADER_TIME, HEADER_NONCE, *needed) if not headers.get(h)]
    if missing:
        raise SignatureError(f"missing signature headers {missing}")
    machine = headers[HEADER_KEY]
    pub = unb64(machine, "machine key", 32)
    timestamp, nonce = headers[HEADER_TIME], headers[HEADER_NONCE]
    try:
        t = parse_number(timestamp, "timestamp", integer=False, minimum=0)
    except NumberError as e:
        raise SignatureError(str(e))
    if abs(now - t) > FRESHNESS_SECONDS:
        raise StaleTimestamp(f"timestamp is {now - t:+.0f}s off (window {FRESHNESS_SECONDS:.0f}s): "
                             "check the agent's clock")
    if not 8 <= len(nonce) <= 64:
        raise SignatureError("nonce must be 8-64 characters")
    message = signed_message(method, path, timestamp, nonce, body)
    if tagged:
        key = stream_key(machine, headers[HEADER_STREAM])
        if key is None:
            raise SignatureError(f"no stream of this machine with a stream key is open on this "
                                 f"replica for {HEADER_STREAM}; sign the request instead")
        tag = headers[HEADER_STREAM_TAG]
        if not tag.isascii() or not hmac.compare_digest(keyed_tag(key, message), tag):
            raise SignatureError("stream tag does not match the request")
    else:
        sig = unb64(headers[HEADER_SIG], "signature", 64)
        try:
            VerifyKey(pub).verify(message, sig)
        except BadSignatureError:
            raise SignatureError("signature does not match the request")
    if not nonces.check_and_add(machine + ":" + nonce, now):
        raise SignatureError("replayed request (nonce already used)")
    return machine


def sign_payload(key: SigningKey, payload: bytes) -> str:
    return b64(key.sign(payload).signature)


def verify_payload(public_keys: list[str], payload: bytes, signature: str) -> bool:
    """True if any of the pinned cluster public keys signed `payload`."""
    try:
        sig = base64.b64decode(signature, validate=True)
    except (ValueError, TypeError):
        return False
    for pub in public_keys:
        try:
            VerifyKey(base64.b64decode(pub)).verify(payload, sig)
            return True
        except (BadSignatureError, ValueError, TypeError):
            continue
    return False


def new_cluster_key() -> dict:
    """A fresh netmap signing key as the clusterkey.* commands carry it (decided before proposing)."""
    key = SigningKey.generate()
    return {"id": secrets.token_hex(6), "private_key": b64(bytes(key)),
            "public_key": b64(bytes(key.verify_key))}
