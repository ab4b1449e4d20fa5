"""What replicas say on their relay links (api/relay_links.py does the I/O): the handshake
that proves both ends hold the cluster secret, the sealing of every message, and records.

Handshake: the dialling replica sends its Raft address and a random nonce with the upgrade
request; the accepting replica answers with its own nonce and a proof (HMAC under the link
key of both addresses, both nonces and its role), the dialler answers with its proof. The
link key is derived from the cluster secret's PBKDF2 master key (cluster/raft/
transport_crypto.py), so watching a handshake does not let anyone guess a weak secret
cheaply, and neither proof can be replayed into another handshake (fresh nonces).

Every later message is AES-256-GCM under a key for its direction (HKDF of the link key and
both nonces) with an implicit counter as its nonce: the link runs over one TCP connection,
so each side knows which counter comes next, and a message injected, replayed, reordered or
altered on the replica network fails to open (the link is then closed).

A message's plaintext is records: kind (1 byte), length (4 bytes), body. FRAME: the
destination's key, then what its session is sent (sender's key and batch, proto/relay.py).
UP / DOWN: up to MAX_KEYS_PER_RECORD keys whose sessions opened / closed on the sender.
Pure: no sockets, no clock.
"""
from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from raftmesh.cluster.raft.transport_crypto import master_key
from raftmesh.proto.relay import KEY_BYTES, MAX_FRAME_BYTES

NONCE_BYTES = 16
PROOF_BYTES = 32
FRAME, UP, DOWN = 1, 2, 3
MAX_KEYS_PER_RECORD = 1024
MAX_PLAINTEXT_BYTES = 256 * 1024  # records sealed together in one message
MAX_MESSAGE_BYTES = MAX_PLAINTEXT_BYTES + 16  # and the GCM tag
_RECORD = struct.Struct("!BI")
MAX_RECORD_BYTES = _RECORD.size + KEY_BYTES + MAX_FRAME_BYTES
_LINK_INFO = b"raftmesh relay link key v1"


class LinkError(ValueError):
    """A handshake or message that does not come from a replica holding the cluster secret
    (or a malformed one): the link is refused or closed."""


def link_key(cluster_secret: str) -> bytes:
    """The key links are proven and sealed under (~50 ms: computed once per process)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=_LINK_INFO).derive(master_key(cluster_secret))


def proof(key: bytes, role: str, dialer: str, acceptor: str, dialer_nonce: bytes,
          acceptor_nonce: bytes) -> bytes:
    what = "\n".join((role, dialer, acceptor)).encode() + dialer_nonce + acceptor_nonce
    return hmac.new(key, what, hashlib.sha256).digest()


def check_proof(got: bytes, *args) -> None:
    if not hmac.compare_digest(got, proof(*args)):
        raise LinkError("the link's proof does not match (not a replica of this cluster)")


class LinkCipher:
    """Seals what one end sends and opens what it receives, each direction under its own
    key and counter."""

    def __init__(self, key: bytes, dialer_nonce: bytes, acceptor_nonce: bytes, dialing: bool):
        def derive(direction: bytes) -> AESGCM:
            return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=dialer_nonce + acceptor_nonce,
                               info=_LINK_INFO + direction).derive(key))
        to_acceptor, to_dialer = derive(b" to acceptor"), derive(b" to dialer")
        self._out, self._in = (to_acceptor, to_dialer) if dialing else (to_dialer, to_acceptor)
        self._sent = self._received = 0

    def seal(self, plaintext: bytes) -> bytes:
        self._sent += 1
        return self._out.encrypt(self._sent.to_bytes(12, "big"), plaintext, None)

    def open(self, message: bytes) -> bytes:
        if len(message) > MAX_MESSAGE_BYTES:
            raise LinkError(f"link message of {len(message)} bytes, more than {MAX_MESSAGE_BYTES}")
        try:
            plaintext = self._in.decrypt((self._received + 1).to_bytes(12, "big"), message, None)
        except InvalidTag:
            raise LinkError("link message failed authentication (injected, replayed or altered)") from None
        self._received += 1
        return plaintext


def record(kind: int, body: bytes) -> bytes:
    return _RECORD.pack(kind, len(body)) + body


def announcements(kind: int, keys: list[bytes]) -> list[bytes]:
    """UP or DOWN records for `keys`, at most MAX_KEYS_PER_RECORD each."""
    return [record(kind, b"".join(keys[i:i + MAX_KEYS_PER_RECORD]))
            for i in range(0, len(keys), MAX_KEYS_PER_RECORD)]


def records(plaintext: bytes) -> list[tuple[int, memoryview]]:
    """(kind, body) of each record, or LinkError naming what is malformed."""
    out, at, view = [], 0, memoryview(plaintext)
    while at < len(plaintext):
        if at + _RECORD.size > len(plaintext):
            raise LinkError("message ends inside a record's header")
        kind, n = _RECORD.unpack_from(plaintext, at)
        at += _RECORD.size
        if at + n > len(plaintext):
            raise LinkError(f"record of {n} bytes overruns the message")
        body = view[at:at + n]
        at += n
        if kind == FRAME and not KEY_BYTES * 2 < n <= KEY_BYTES + MAX_FRAME_BYTES:
            raise LinkError(f"frame record of {n} bytes")
        if kind in (UP, DOWN) and (n % KEY_BYTES or not 0 < n <= KEY_BYTES * MAX_KEYS_PER_RECORD):
            raise LinkError(f"announcement of {n} bytes: not 1 to {MAX_KEYS_PER_RECORD} keys")
        if kind not in (FRAME, UP, DOWN):
            raise LinkError(f"unknown record kind {kind}")
        out.append((kind, body))
    return out


def keys_of(body: memoryview) -> list[bytes]:
    return [bytes(body[i:i + KEY_BYTES]) for i in range(0, len(body), KEY_BYTES)]
