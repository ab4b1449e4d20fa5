"""Agent request signatures: proof of the machine key on every request, no bearer secret.

An agent signs `method, path, timestamp, nonce, sha256(body)` with its Ed25519 machine key.
A replica accepts a signature within a freshness window and remembers nonces for that
window, so a captured request cannot be replayed to the same replica, and a proxy, a log or
a replica that sees the request learns nothing it could use later. Pure functions plus a
small nonce cache; the caller supplies the clock.
"""
from __future__ import annotations

import base64
import hashlib
import secrets
from collections import OrderedDict

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

FRESHNESS_SECONDS = 30.0
HEADER_KEY = "X-Raftmesh-Machine"
HEADER_TIME = "X-Raftmesh-Time"
HEADER_NONCE = "X-Raftmesh-Nonce"
HEADER_SIG = "X-Raftmesh-Signature"


class SignatureError(ValueError):
    """The request does not prove possession of the machine key; message says why."""


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
                   nonces: NonceCache) -> str:
    """Return the base64 machine public key the request proves, or raise SignatureError."""
    missing = [h for h in (HEADER_KEY, HEADER_TIME, HEADER_NONCE, HEADER_SIG) if not headers.get(h)]
    if missing:
        raise SignatureError(f"missing signature headers {missing}")
    machine = headers[HEADER_KEY]
    pub = unb64(machine, "machine key", 32)
    sig = unb64(headers[HEADER_SIG], "signature", 64)
    timestamp, nonce = headers[HEADER_TIME], headers[HEADER_NONCE]
    try:
        t = float(timestamp)
    except ValueError:
        raise SignatureError("timestamp is not a number")
    if abs(now - t) > FRESHNESS_SECONDS:
        raise SignatureError(f"timestamp is {now - t:+.0f}s off (window {FRESHNESS_SECONDS:.0f}s): "
                             "check the agent's clock")
    if not 8 <= len(nonce) <= 64:
        raise SignatureError("nonce must be 8-64 characters")
    try:
        VerifyKey(pub).verify(signed_message(method, path, timestamp, nonce, body), sig)
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
