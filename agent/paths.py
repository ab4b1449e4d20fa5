"""Probes and STUN from the WireGuard port, without taking the port from wireguard-go.

A NAT maps the tunnel's packets by their source port, so discovery (STUN) and probes
(agent/disco.py) must leave from WireGuard's own UDP port, which wireguard-go holds. A raw
IPv4 socket sends UDP datagrams with that source port, built here, and receives a copy of
every UDP datagram the host gets; a classic BPF filter in the kernel passes only those to
the WireGuard port that start like a probe or carry STUN's magic cookie, so the tunnel's
own packets never reach Python. Answers still reach wireguard-go's socket too, which drops
them as not WireGuard (Tailscale's magicsock reads the same way on Linux).

One thread per agent: it sends due probes, reads answers, and asks STUN every
STUN_INTERVAL (sooner while no answer came), reporting a changed mapping to the daemon.
Our candidates also go to every peer without a direct path over the relay (`tell`; sealed,
agent/disco.py) when the peer is in our WireGuard, our candidates change or the relay session
comes up, and what peers tell us there (`told`) is searched at once. Being told also says
that the peer has us in its WireGuard now, so `peer_told` (TOLD_GRACE later) lets the daemon
resend a first handshake initiation that left before that and went unanswered.
"""
from __future__ import annotations

import base64
import ctypes
import ipaddress
import logging
import secrets
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

from raftmesh.proto import stun

from . import disco, exit_node

log = logging.getLogger("raftmesh.agent.paths")
SO_ATTACH_FILTER = 26
# The peer's message may overtake the answer to an initiation it got just after sending it
# (relayed hops are slow on a loaded host): a new initiation would void that answer, and if
# it reached the peer within 20 ms of the first, WireGuard's flood limit would drop it.
TOLD_GRACE = 0.25
STUN_INTERVAL = 20.0  # a NAT rebinding shows up within this (and in probes at once)
STUN_RETRY = 1.0


def _bpf_program(port: int) -> bytes:
    """cBPF over an IPv4 packet: UDP to `port` whose payload starts with disco.MAGIC or
    carries the STUN cookie at offset 4."""
    magic = int.from_bytes(disco.MAGIC, "big")
    cookie = int.from_bytes(stun.COOKIE, "big")
    insns = [
        (0xb1, 0, 0, 0),        # ldxb 4*([0]&0xf)       X = IP header length
        (0x48, 0, 0, 2),        # ldh [x+2]              UDP destination port
        (0x15, 0, 5, port),     # jeq port ? next : drop
        (0x40, 0, 0, 8),        # ld [x+8]               first payload word
        (0x15, 2, 0, magic),    # jeq MAGIC ? accept : next
        (0x40, 0, 0, 12),       # ld [x+12]              STUN cookie position
        (0x15, 0, 1, cookie),   # jeq COOKIE ? accept : drop
        (0x06, 0, 0, 65535),    # accept
        (0x06, 0, 0, 0),        # drop
    ]
    return b"".join(struct.pack("HBBI", *i) for i in insns)


def udp_datagram(src_port: int, dst_port: int, payload: bytes) -> bytes:
    """A UDP header (checksum 0: none, allowed over IPv4) and `payload`."""
    return struct.pack("!HHHH", src_port, dst_port, 8 + len(payload), 0) + payload


def parse_ipv4_udp(packet: bytes) -> tuple[str, int, bytes] | None:
    """(source ip, source port, payload) of an IPv4 UDP packet, None if truncated."""
    if len(packet) < 20:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if len(packet) < ihl + 8:
        return None
    src = socket.inet_ntoa(packet[12:16])
    sport, _, length = struct.unpack("!HHH", packet[ihl:ihl + 6])
    return src, sport, packet[ihl + 8:ihl + max(8, length)]


def split_endpoint(endpoint: str) -> tuple[str, int] | None:
    """IPv4 `ip:port` as a tuple; None for anything else (IPv6 is not probed yet)."""
    host, _, port = endpoint.rpartition(":")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return (str(ip), int(port)) if ip.version == 4 and port.isdigit() else None


class PathProber:
    """The thread that keeps each peer's path (and our STUN mapping) current."""

    def __init__(self, port: int, keys: Callable[[], tuple[bytes, bytes]],
                 set_endpoint: Callable[[str, str], None], mapped_changed: Callable[[str], None],
                 path_lost: Callable[[str], None], tell: Callable[[bytes, bytes], None],
                 peer_told: Callable[[str], None] = lambda key: None):
        self.port = port
        self.keys = keys  # () -> (our WireGuard private key, public key), raw bytes
        self.set_endpoint, self.mapped_changed = set_endpoint, mapped_changed
        self.path_lost = path_lost
        self.tell = tell  # (peer's key, message) -> through the relay, if a session is up
        self.peer_told = peer_told  # called from this thread, TOLD_GRACE after a peer told us
        self._told_by: dict[str, float] = {}  # peer key -> when to call peer_told
        self.own: tuple[str, ...] = ()  # our candidates
        self.finder = disco.PathFinder()
        self.lock = threading.Lock()
        self.stun_servers: list[tuple[str, int]] = []
        self.mapped: str | None = None
        self._stun_tx: dict[bytes, float] = {}
        self._next_stun = 0.0
        self._stop = threading.Event()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        prog = ctypes.create_string_buffer(_bpf_program(port))
        fprog = struct.pack("HL", len(prog.raw) // 8, ctypes.addressof(prog))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        # probes and STUN are underlay traffic, like WireGuard's own: marked as WireGuard
        # marks it, they stay out of an exit node's tunnel (agent/exit_node.py)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, exit_node.TABLE)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)  # a wake-up already pending is enough
        self.thread = threading.Thread(target=self._run, name="paths", daemon=True)
        self.ready = threading.Event()  # set once aioice is imported: probes and STUN can go

    # -- from the daemon's thread --------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake()
        if self.thread.is_alive():
            self.thread.join(timeout=5)
        for s in (self.sock, self._wake_r, self._wake_w):
            s.close()

    def set_peers(self, candidates: dict[str, tuple[str, ...]]) -> list[str]:
        """Probe these peers' candidates; the peers that are new, to be told our candidates
        (`tell_candidates`) once they are in WireGuard."""
        with self.lock:
            new = [k for k in candidates if k not in self.finder.peers]
            self.finder.set_peers(candidates, time.monotonic())
        self._wake()
        return new

    def set_own_candidates(self, own: tuple[str, ...]) -> None:
        with self.lock:
            changed, self.own = own != self.own, own
        if changed:
            self.tell_candidates()

    def tell_candidates(self, keys: list[str] | None = None) -> None:
        """Send our candidates over the relay to these peers (default: all) that have no
        direct path; from any thread."""
        with self.lock:
            own = self.own
            searching = self.finder.searching()
        own = [c for c in own if split_endpoint(c) is not None][:disco.MAX_TOLD]  # what is probed
        if not own:
            return
        private, public = self.keys()
        text = ",".join(own)
        for key in searching if keys is None else set(keys) & set(searching):
            peer = base64.b64decode(key)
            self.tell(peer, disco.seal(disco.Probe(disco.CANDIDATES, secrets.token_bytes(12), text),
                                       private, public, peer))

    def told(self, sender: bytes, message: bytes) -> None:
        """From the relay's thread: a peer's sealed candidates (else dropped)."""
        private, _ = self.keys()
        key = base64.b64encode(sender).decode()
        try:
            if disco.sender_of(message) != sender:
                raise disco.ProbeError("sealed by another key than the relayed sender's")
            with self.lock:
                if key not in self.finder.peers:
                    raise disco.ProbeError("sender is not a peer in our netmap")
            probe = disco.open_probe(message, private, sender)
            if probe.kind != disco.CANDIDATES:
                raise disco.ProbeError("a probe over the relay")
        except disco.ProbeError as e:
            log.debug("dropped a message relayed from %s: %s", key[:8], e)
            return
        candidates = tuple(c for c in probe.seen_from.split(",") if split_endpoint(c) is not None)
        with self.lock:
            news = self.finder.told(key, candidates, time.monotonic())
            self._told_by.setdefault(key, time.monotonic() + TOLD_GRACE)
        if news:
            log.info("%s told us its candidates over the relay: %s", key[:8], ", ".join(candidates))
        self._wake()

    def set_stun_servers(self, servers: list[tuple[str, int]]) -> None:
        with self.lock:
            if servers != self.stun_servers:
                self.stun_servers, self._next_stun = servers, 0.0
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except BlockingIOError:
            pass

    def direct(self) -> dict[str, str]:
        with self.lock:
            return self.finder.direct()

    # -- the thread ----------------------------------------------------------------------------
    def _send(self, addr: tuple[str, int], payload: bytes) -> None:
        try:
            self.sock.sendto(udp_datagram(self.port, addr[1], payload), (addr[0], 0))
        except OSError as e:  # no route yet, or UDP blocked locally: the next round retries
            log.debug("send to %s:%d: %s", *addr, e)

    def _run(self) -> None:
        stun.codec()  # aioice loads here, while the daemon's main thread starts (proto/stun.py)
        self.ready.set()
        while not self._stop.is_set():
            now = time.monotonic()
            private, public = self.keys()
            with self.lock:
                pings = self.finder.due(now, lambda: secrets.token_bytes(12))
                wake = self.finder.next_wakeup(now)
                lost, self.finder.lost = self.finder.lost, set()
                told_by = [k for k, due in self._told_by.items() if due <= now]
                for key in told_by:
                    del self._told_by[key]
                wake = min([wake, *self._told_by.values()])
                if lost:  # perhaps our own mapping changed: ask STUN now
                    self._next_stun = now
            for key in lost:
                self.path_lost(key)
            for key in told_by:
                self.peer_told(key)
            for key, cand, txid in pings:
                addr = split_endpoint(cand)
                if addr is not None:
                    self._send(addr, disco.seal(disco.Probe(disco.PING, txid), private, public,
                                                base64.b64decode(key)))
            wake = min(wake, self._stun(now))
            ready, _, _ = select.select([self.sock, self._wake_r], [], [],
                                        max(0.0, min(1.0, wake - time.monotonic())))
            if self._wake_r in ready:
                self._wake_r.recv(64)
            if self.sock in ready:
                self._receive(private, public)

    def _stun(self, now: float) -> float:
        """Ask the STUN servers when due; when to ask next."""
        with self.lock:
            servers = list(self.stun_servers)
        if not servers:
            return now + 1.0
        if now >= self._next_stun:
            self._stun_tx = {t: s for t, s in self._stun_tx.items() if now - s < 10}
            for server in servers:
                txid = stun.new_transaction_id()
                self._stun_tx[txid] = now
                self._send(server, stun.binding_request(txid))
            self._next_stun = now + (STUN_INTERVAL if self.mapped else STUN_RETRY)
        return self._next_stun

    def _receive(self, private: bytes, public: bytes) -> None:
        """Drain the socket: STUN answers, pings (answered) and pongs."""
        while True:
            try:
                packet = self.sock.recv(2048, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            parsed = parse_ipv4_udp(packet)
            if parsed is None:
                continue
            ip, port, payload = parsed
            source = f"{ip}:{port}"
            if payload[:4] == disco.MAGIC:
                self._probe(payload, source, (ip, port), private, public)
            else:
                self._stun_answer(payload)

    def _stun_answer(self, payload: bytes) -> None:
        txid = payload[8:20]
        if txid not in self._stun_tx:
            return
        try:
            mapped = stun.mapped_address(payload, txid)
        except stun.StunError as e:
            log.info("ignoring a STUN answer: %s", e)
            return
        del self._stun_tx[txid]
        if mapped != self.mapped:
            log.info("STUN: our WireGuard port is %s from outside", mapped)
            self.mapped = mapped
            self._next_stun = time.monotonic() + STUN_INTERVAL
            self.mapped_changed(mapped)

    def _probe(self, payload: bytes, source: str, addr: tuple[str, int],
               private: bytes, public: bytes) -> None:
        try:
            sender = disco.sender_of(payload)
            key = base64.b64encode(sender).decode()
            with self.lock:
                known = key in self.finder.peers
            if not known:
                raise disco.ProbeError("sender is not a peer in our netmap")
            probe = disco.open_probe(payload, private, sender)
            if probe.kind == disco.CANDIDATES:
                raise disco.ProbeError("candidates come over the relay, not as a probe")
        except disco.ProbeError as e:
            log.debug("dropped a probe from %s: %s", source, e)
            return
        now = time.monotonic()
        if probe.kind == disco.PING:
            self._send(addr, disco.seal(disco.Probe(disco.PONG, probe.txid, source), private,
                                        public, sender))
            with self.lock:
                self.finder.search(key, now)  # the peer is looking for us: look back now
            return
        with self.lock:
            endpoint = self.finder.pong(key, probe.txid, source, now)
        if endpoint is not None:
            log.info("direct path to %s: %s", key[:8], endpoint)
            self.set_endpoint(key, endpoint)

