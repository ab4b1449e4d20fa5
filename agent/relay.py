"""The agent's side of the relay (api/relay.py): WireGuard packets over a WebSocket to a replica.

wireguard-go only speaks UDP, so each relayed peer gets a local UDP socket on 127.0.0.1 that
stands for it (NetBird's proxy does the same): WireGuard's endpoint for the peer is that
socket's address; what wireguard-go sends there goes to the relay addressed to the peer, and
what the relay delivers from the peer is sent from that socket to wireguard-go's port, so
WireGuard sees the peer at the same endpoint either way. A direct path, once a probe proves
one, simply replaces the endpoint (agent/paths.py); the relay stays up for the next peer.

Throughput comes from batching (proto/relay.py): a readable socket is drained at once, and
its packets wait in a bounded list while the session's sender writes the previous batch, so
under load one WebSocket message carries many packets and at rest a packet leaves at once.
What the session cannot take (the list is full) is dropped, as a congested link would:
WireGuard's traffic is its own retransmission's business.

A packet that starts with disco.MAGIC is never WireGuard's (a peer's sealed candidates,
agent/paths.py): it goes to `told`, not to wireguard-go, and `send` queues such packets.
WireGuard moves a peer's endpoint to wherever its last packet came from, so a packet that
arrives relayed (one overtaken by the switch to a direct path, or sent by a peer still
searching) takes the peer back to the relay: REASSERT_DELAY after relayed packets from a
peer, `relayed` lets the daemon point it back at a proven direct path (at most that often,
however many packets come; the delay lets wireguard-go take the packets first).

Every agent prefers the same replica for its relay session (the first of the sorted server
URLs that answers), so two agents usually meet on one replica (relayed in one hop; the
replicas forward between sessions on different ones, api/relay_links.py); when that replica dies the session
moves to the next at once (the connection is reset or its heartbeat goes unanswered), and
back to the preferred one when it returns (checked every PREFERRED_RETRY seconds).
"""
from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from nacl.signing import SigningKey

from raftmesh.proto.machine_auth import sign_headers
from raftmesh.proto.relay import (MAX_FRAME_BYTES, MAX_PACKET_BYTES, RelayFrameError, frames, packets,
                                  split_frame)
from raftmesh.proto.routes import RELAY
from raftmesh.proto.version import version_header

from .disco import MAGIC

if TYPE_CHECKING:  # imported by the relay's thread: ~0.5 s that the daemon's start does not wait for
    import aiohttp

log = logging.getLogger("raftmesh.agent.relay")
HEARTBEAT = 2.0  # a partitioned replica is noticed after 3 s; a dead one at once (reset)
PREFERRED_RETRY = 5.0
RETRY = 0.2
REASSERT_DELAY = 0.2
PENDING_LIMIT = 1 << 20  # bytes read from wireguard-go and not yet written to the session
READ_BUDGET = 256  # packets taken from one socket per wake-up: a busy peer cannot starve others
SOCKET_BUFFER = 1 << 20  # a local socket's receive buffer: wireguard-go's bursts wait there


class RelayClient:
    """One relay session in a thread of its own, and the local sockets that stand for peers."""

    def __init__(self, servers: list[str], machine_key: SigningKey, wg_port: int,
                 changed: Callable[[], None], told: Callable[[bytes, bytes], None] = lambda k, m: None,
                 relayed: Callable[[bytes], None] = lambda k: None):
        self.servers = sorted(s.rstrip("/") for s in servers)
        self.key, self.wg_port, self.changed, self.told = machine_key, wg_port, changed, told
        self.relayed = relayed
        self._relayed_due: set[bytes] = set()  # peers whose `relayed` call is scheduled
        self.server: str | None = None  # the replica URL while the session is up
        self.proxies: dict[bytes, socket.socket] = {}  # peer key -> its local socket
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._pending: dict[bytes, list[bytes]] = {}  # peer key -> packets for the session
        self._pending_bytes = 0
        self._wake: asyncio.Event | None = None  # set when _pending has packets
        self.thread = threading.Thread(target=self._thread_main, name="relay", daemon=True)
        self._stop: asyncio.Event | None = None
        self._retry: asyncio.Event | None = None  # set: the next attempt need not wait
        self.ready = threading.Event()  # set once aiohttp is imported: sessions can start

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        if self._stop is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self._shutdown)
        if self.thread.ident is not None:  # started
            self.thread.join(timeout=5)
        with self.lock:
            for sock in self.proxies.values():
                sock.close()
            self.proxies.clear()

    def retry_now(self) -> None:
        """Try again without waiting out the pause (the node was just registered, so the
        replica that refused the session takes it now); from any thread."""
        if self._retry is not None:
            self.loop.call_soon_threadsafe(self._retry.set)

    def endpoint_for(self, node_key: str) -> str | None:
        """The local endpoint standing for this peer while the relay is up, else None."""
        if self.server is None:
            return None
        return f"127.0.0.1:{self._proxy(base64.b64decode(node_key)).getsockname()[1]}"

    def send(self, key: bytes, packet: bytes) -> None:
        """A packet for the peer through the session (dropped without one); from any thread."""
        if self.server is not None:
            self.loop.call_soon_threadsafe(self._queue, key, [packet])

    def retain(self, node_keys: set[str]) -> None:
        """Close the sockets of peers no longer in the netmap."""
        keep = {base64.b64decode(k) for k in node_keys}
        with self.lock:
            gone = [k for k in self.proxies if k not in keep]
            socks = [self.proxies.pop(k) for k in gone]
        for sock in socks:
            self.loop.call_soon_threadsafe(self._forget, sock)

    def _shutdown(self) -> None:
        """Stop, and end an open session's read at once (in the relay's loop)."""
        self._stop.set()
        self._retry.set()
        if self.ws is not None:
            self.loop.create_task(self.ws.close())

    def _forget(self, sock: socket.socket) -> None:
        self.loop.remove_reader(sock.fileno())
        sock.close()

    # -- the relay thread ------------------------------------------------------------------------
    def _proxy(self, key: bytes) -> socket.socket:
        with self.lock:
            sock = self.proxies.get(key)
            if sock is None:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
                sock.bind(("127.0.0.1", 0))
                sock.setblocking(False)
                self.proxies[key] = sock
                self.loop.call_soon_threadsafe(self.loop.add_reader, sock.fileno(),
                                               self._from_wireguard, key, sock)
        return sock

    def _from_wireguard(self, key: bytes, sock: socket.socket) -> None:
        """Packets wireguard-go sent to the peer's local socket: to the session's sender."""
        taken = []
        for _ in range(READ_BUDGET):
            try:
                packet = sock.recv(MAX_PACKET_BYTES + 1)
            except OSError:  # BlockingIOError: drained
                break
            if len(packet) <= MAX_PACKET_BYTES:  # else not a WireGuard packet: dropped
                taken.append(packet)
        self._queue(key, taken)

    def _queue(self, key: bytes, packets: list[bytes]) -> None:
        """For the session's sender; dropped without a session or when it is behind."""
        taken = []
        for packet in packets:
            if self.ws is None or self._pending_bytes >= PENDING_LIMIT:
                break
            taken.append(packet)
            self._pending_bytes += len(packet)
        if taken:
            self._pending.setdefault(key, []).extend(taken)
            self._wake.set()

    async def _send_pending(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """The session's writer: whatever piled up while it wrote the last batch, in frames."""
        import aiohttp
        while True:
            await self._wake.wait()
            self._wake.clear()
            pending, self._pending, self._pending_bytes = self._pending, {}, 0
            try:
                for key, taken in pending.items():
                    for frame in frames(key, taken):
                        await ws.send_bytes(frame)
            except (ConnectionError, aiohttp.ClientError):
                return  # the session is gone; its reader notices and ends it

    def _thread_main(self) -> None:
        try:
            self.loop.run_until_complete(self._run())
        finally:
            self.loop.close()

    async def _run(self) -> None:
        import aiohttp
        self.ready.set()
        self._stop, self._wake, self._retry = asyncio.Event(), asyncio.Event(), asyncio.Event()
        async with aiohttp.ClientSession() as http:
            while not self._stop.is_set():
                for server in self.servers:
                    # Only an unreachable replica sends us to the next one; after a session, or
                    # a refusal (not registered yet), start over from the preferred: agents
                    # meet there.
                    if self._stop.is_set():
                        break
                    outcome = await self._session(http, server)
                    if outcome == "ended":
                        break
                    if outcome == "refused":
                        await self._pause()
                        break
                else:
                    await self._pause()

    async def _pause(self) -> None:
        """RETRY, unless stopped or told to retry now."""
        try:
            await asyncio.wait_for(self._retry.wait(), RETRY)
        except asyncio.TimeoutError:
            pass
        self._retry.clear()

    async def _session(self, http: aiohttp.ClientSession, server: str) -> str:
        """One session until it "ended"; at once "refused" (the replica answered no) or
        "unreachable"."""
        import aiohttp
        url = server + RELAY
        headers = sign_headers(self.key, "GET", urlsplit(url).path, b"", time.time(),
                               secrets.token_hex(12))
        headers.update(version_header())
        try:
            ws = await http.ws_connect(url, headers=headers, heartbeat=HEARTBEAT,
                                       max_msg_size=MAX_FRAME_BYTES, timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=1.0))
        except aiohttp.WSServerHandshakeError as e:
            log.debug("relay %s: %s", server, e)
            return "refused" if e.status < 500 else "unreachable"
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            log.debug("relay %s: %s", server, e)
            return "unreachable"
        self.ws, self.server = ws, server
        log.info("relay session on %s", server)
        self.changed()
        preferred = server == self.servers[0]
        sender = asyncio.create_task(self._send_pending(ws))
        try:
            while not self._stop.is_set():
                try:
                    msg = await ws.receive(timeout=None if preferred else PREFERRED_RETRY)
                except asyncio.TimeoutError:
                    if await self._preferred_back(http):
                        break
                    continue
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break  # closed, or an error
                self._to_wireguard(msg.data)
        finally:
            self.ws, self.server = None, None
            sender.cancel()
            await ws.close()
            self._pending.clear()
            log.info("relay session on %s ended", server)
            self.changed()
        return "ended"

    async def _preferred_back(self, http: aiohttp.ClientSession) -> bool:
        """Whether the preferred replica answers again (then the session moves there)."""
        import aiohttp
        try:
            async with http.get(self.servers[0] + "/healthz", timeout=aiohttp.ClientTimeout(total=1)) as r:
                return r.status == 200
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            return False

    def _to_wireguard(self, data: bytes) -> None:
        try:
            sender, batch = split_frame(data)
            received = packets(batch)
        except RelayFrameError:
            return
        sock = self._proxy(sender)
        for packet in received:
            if packet[:len(MAGIC)] == MAGIC:
                self.told(sender, bytes(packet))
                continue
            try:
                sock.sendto(packet, ("127.0.0.1", self.wg_port))
            except OSError:  # wireguard-go's buffer is full: dropped
                pass
        if sender not in self._relayed_due:
            self._relayed_due.add(sender)
            self.loop.call_later(REASSERT_DELAY, self._after_relayed, sender)

    def _after_relayed(self, sender: bytes) -> None:
        self._relayed_due.discard(sender)
        self.relayed(sender)
