"""Direct paths between peers behind NATs: probe messages and the decisions about them.

Both agents of a pair learn each other's candidates (local addresses and the STUN-mapped
address, Peer.endpoints) from their map streams at about the same time and probe them all
from their WireGuard port, so each side's NAT has a mapping towards the other by the time
the other side's probes arrive (an endpoint-independent NAT then lets them in). The first
candidate that answers becomes WireGuard's endpoint; a held path is re-probed and, when it
stops answering (a NAT rebinding, a restart), dropped and searched again. Same idea as
Tailscale's disco, with the peers' WireGuard keys instead of separate disco keys.

A probe is MAGIC, the sender's WireGuard public key, a nonce and a NaCl box (X25519 between
the two WireGuard keys, XSalsa20-Poly1305) of kind + transaction id (+ the address a pong
saw the ping come from). A receiver drops it unless the key is one of its netmap's peers and
the box opens: nobody outside the mesh gets an answer, and an answer proves the path.

The same box, of kind CANDIDATES, carries an agent's own candidates to a peer over the relay
(protocol version 3) when they are newer than what the peer's netmap can say: a new agent's
STUN mapping reaches its peers this way at once, not after a Raft write and a netmap delta,
so both sides probe the new address at once. The relay can drop or replay such a message
but not forge one, and told candidates are only probed (a path still needs a pong).

Pure: no sockets or clock; agent/paths.py does the I/O and passes `now`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

MAGIC = b"RMd1"  # never a WireGuard message type (1-4 little endian) nor a STUN header
PING, PONG, CANDIDATES = 1, 2, 3
MAX_TOLD = 6  # candidates in one CANDIDATES message: it stays within MAX_PROBE_BYTES
MAX_PROBE_BYTES = 256
BURST_INTERVAL = 0.2  # while searching, each candidate is pinged this often
BURST_LENGTH = 10.0  # then every SLOW_INTERVAL, until the candidates change
SLOW_INTERVAL = 2.0
HEARTBEAT = 1.0  # a held path is pinged this often
PATH_TIMEOUT = 3.5  # and dropped after this long without a pong (a rebinding)


class ProbeError(ValueError):
    """A datagram that is not a probe for us from a peer; dropped."""


@dataclass(frozen=True)
class Probe:
    kind: int
    txid: bytes  # 12 bytes
    seen_from: str = ""  # a pong: where the ping came from (the sender's outside address);
    # CANDIDATES: the sender's candidates, comma-separated


def seal(probe: Probe, own_private: bytes, own_public: bytes, peer_public: bytes) -> bytes:
    body = bytes([probe.kind]) + probe.txid + probe.seen_from.encode()
    box = Box(PrivateKey(own_private), PublicKey(peer_public))
    return MAGIC + own_public + bytes(box.encrypt(body, os.urandom(24)))


def sender_of(data: bytes) -> bytes:
    """The claimed sender key of a probe (checked by `open_probe`)."""
    if len(data) > MAX_PROBE_BYTES or len(data) < 4 + 32 + 24 + 16 + 13 or data[:4] != MAGIC:
        raise ProbeError("not a probe")
    return data[4:36]


def open_probe(data: bytes, own_private: bytes, peer_public: bytes) -> Probe:
    try:
        body = Box(PrivateKey(own_private), PublicKey(peer_public)).decrypt(data[36:])
    except CryptoError:
        raise ProbeError("probe does not authenticate") from None
    if body[0] not in (PING, PONG, CANDIDATES) or len(body) < 13:
        raise ProbeError("unknown probe kind")
    try:
        seen = body[13:].decode("ascii")
    except UnicodeDecodeError:
        raise ProbeError("bad address in pong") from None
    return Probe(body[0], body[1:13], seen)


@dataclass
class PeerPaths:
    """What we know about reaching one peer."""

    candidates: tuple[str, ...]  # from the netmap
    told: tuple[str, ...] = ()  # from the peer over the relay (CANDIDATES), until the netmap's change
    path: str | None = None  # the endpoint WireGuard uses, once a pong proved it
    path_since: float | None = None
    last_pong: float = 0.0
    search_started: float = 0.0
    next_ping: float = 0.0
    pending: dict[bytes, tuple[str, float]] = field(default_factory=dict)  # txid -> (cand, sent)


class PathFinder:
    """Which candidates to ping when, and which endpoint each peer's path is."""

    def __init__(self):
        self.peers: dict[str, PeerPaths] = {}  # by WireGuard public key (base64)
        self.lost: set[str] = set()  # peers whose path stopped answering (the driver clears it)

    def set_peers(self, candidates: dict[str, tuple[str, ...]], now: float) -> None:
        """The netmap's peers and their candidates: new or changed ones are searched now."""
        for key in set(self.peers) - set(candidates):
            del self.peers[key]
        for key, cands in candidates.items():
            cur = self.peers.get(key)
            if cur is None or cur.candidates != cands:
                keep = cur.path if cur is not None and cur.path in cands else None
                self.peers[key] = PeerPaths(cands, (), keep, cur.path_since if keep else None,
                                            cur.last_pong if keep else 0.0, now, now)

    def told(self, key: str, candidates: tuple[str, ...], now: float) -> bool:
        """Candidates the peer sent us over the relay: searched now (True), besides the
        netmap's, unless a path is held or they are no news."""
        p = self.peers.get(key)
        if p is None or p.path is not None or set(candidates) <= set(p.candidates + p.told):
            return False
        p.told = candidates[:MAX_TOLD]
        p.search_started = p.next_ping = now
        return True

    def search(self, key: str, now: float) -> None:
        """Search this peer's candidates again now (it pinged us without a path here)."""
        p = self.peers.get(key)
        if p is not None and p.path is None and now - p.search_started > BURST_INTERVAL:
            p.search_started, p.next_ping = now, now

    def due(self, now: float, new_txid) -> list[tuple[str, str, bytes]]:
        """Pings to send now: (peer key, candidate, txid)."""
        out = []
        for key, p in self.peers.items():
            candidates = p.candidates + tuple(c for c in p.told if c not in p.candidates)
            if now < p.next_ping or not candidates:
                continue
            if p.path is not None and now - p.last_pong > PATH_TIMEOUT:
                p.path, p.path_since, p.search_started = None, None, now  # rebinding: search
                self.lost.add(key)
            targets = (p.path,) if p.path is not None else candidates
            for cand in targets:
                txid = new_txid()
                p.pending[txid] = (cand, now)
                out.append((key, cand, txid))
            if len(p.pending) > 64:  # answers to old pings are of no use: bound the memory
                for txid in list(p.pending)[:-32]:
                    del p.pending[txid]
            if p.path is not None:
                p.next_ping = now + HEARTBEAT
            elif now - p.search_started < BURST_LENGTH:
                p.next_ping = now + BURST_INTERVAL
            else:
                p.next_ping = now + SLOW_INTERVAL
        return out

    def pong(self, key: str, txid: bytes, source: str, now: float) -> str | None:
        """A pong from `source`: the new endpoint for WireGuard if this made one, else None."""
        p = self.peers.get(key)
        sent = p.pending.get(txid) if p is not None else None
        if sent is None or sent[0] != source:
            return None
        del p.pending[txid]
        p.last_pong = now
        if p.path is not None:
            return None
        p.path, p.path_since, p.next_ping = source, now, now + HEARTBEAT
        return source

    def next_wakeup(self, now: float) -> float:
        return min((p.next_ping for p in self.peers.values() if p.candidates or p.told),
                   default=now + 1.0)

    def searching(self) -> list[str]:
        """Peers without a direct path."""
        return [k for k, p in self.peers.items() if p.path is None]

    def direct(self) -> dict[str, str]:
        """Peers with a proven direct path: key -> endpoint."""
        return {k: p.path for k, p in self.peers.items() if p.path is not None}
