"""Relay links: replicas forward relay frames to each other, so two agents whose relay
sessions are on different replicas (a load balancer spreading sessions, an agent that failed
over while its peer did not) still reach each other.

One WebSocket per pair of current Raft members, dialled by the member with the lower Raft
address to the other's API URL (the replicated members table) at LINK_PATH. Only a current
member may connect, both ends prove that they hold the cluster secret, and every message is
sealed (api/relay_link_wire.py), so nobody on the replica network can open or feed a link.
Over a link each replica announces the keys of its sessions (all of them when the link
opens, then each opening and closing); RelayHub.remote maps a key to the link it was last
announced on, and loses a link's keys when the link closes. A frame crosses at most one
link: what arrives on one is delivered to a session here or dropped, never sent on.

Bounds: a link queues at most LINK_BUFFER bytes of frames (more are dropped and counted);
announcements are not dropped, but a link whose queue grows past twice that is closed (it
is dialled again and rebuilt from scratch); a message is at most MAX_MESSAGE_BYTES.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
from functools import cached_property

import aiohttp
from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry, Counter, Gauge

from .admin import member_api_urls
from .errors import APIError
from .relay import HUB, RelayHub
from .relay_link_wire import (DOWN, FRAME, MAX_MESSAGE_BYTES, MAX_PLAINTEXT_BYTES, NONCE_BYTES,
                              PROOF_BYTES, UP, LinkCipher, LinkError, announcements, check_proof,
                              keys_of, link_key, proof, record, records)
from .responses import RELAY_LINK
from .routing import Ctx, route

log = logging.getLogger("raftmesh.relay.links")
LINK_PATH = "/replica/relay-link"
HEADER_FROM = "X-Raftmesh-Link-From"  # the dialler's Raft address
HEADER_NONCE = "X-Raftmesh-Link-Nonce"  # its nonce, hex
RECONCILE = 1.0  # how often membership is compared with the links (dial, close)
HANDSHAKE_TIMEOUT = 2.0
HEARTBEAT = 2.0  # a link to a dead replica closes within about 3 s (at once if it is reset)
LINK_BUFFER = 4 << 20


class Link:
    """One proven link to another replica: its send queue, writer and reader."""

    def __init__(self, peer: str, ws, cipher: LinkCipher, links: "Links"):
        self.peer, self.ws, self.cipher, self.links = peer, ws, cipher, links
        self.pending: collections.deque[bytes] = collections.deque()
        self.pending_bytes = 0
        self.wake = asyncio.Event()
        self._closing: asyncio.Future | None = None

    def backlogged(self) -> bool:
        return self.pending_bytes > LINK_BUFFER

    def forward(self, body: bytes) -> None:
        self._queue(record(FRAME, body))

    def announce(self, kind: int, keys: list[bytes]) -> None:
        for r in announcements(kind, keys):
            self._queue(r)
        if self.pending_bytes > 2 * LINK_BUFFER:
            log.warning("relay link to %s: %d bytes queued; closing it", self.peer, self.pending_bytes)
            self.close()

    def close(self) -> None:
        if self._closing is None:
            self._closing = asyncio.ensure_future(self.ws.close())

    def _queue(self, r: bytes) -> None:
        self.pending.append(r)
        self.pending_bytes += len(r)
        self.wake.set()

    async def run(self, hub: RelayHub) -> None:
        """Until the link breaks: announce this replica's sessions, then write and read."""
        self.announce(UP, list(hub.sessions))
        writer = asyncio.create_task(self._write())
        try:
            async for msg in self.ws:
                if msg.type == WSMsgType.ERROR:
                    break
                if msg.type != WSMsgType.BINARY:
                    raise LinkError(f"a {msg.type.name} message on a relay link")
                for kind, body in records(self.cipher.open(msg.data)):
                    if kind == FRAME:
                        (self.links.delivered if await hub.deliver(body) else self.links.dropped).inc()
                    elif kind == UP:
                        for key in keys_of(body):
                            hub.remote[key] = self
                    else:
                        for key in keys_of(body):
                            if hub.remote.get(key) is self:
                                del hub.remote[key]
        except LinkError as e:
            self.links.refused.inc()
            log.warning("relay link to %s closed: %s", self.peer, e)
        finally:
            writer.cancel()
            for key in [k for k, link in hub.remote.items() if link is self]:
                del hub.remote[key]
            await self.ws.close()

    async def _write(self) -> None:
        """Whatever piled up while the last message was written goes out as one message."""
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                while self.pending:
                    parts, size = [], 0
                    while self.pending and size + len(self.pending[0]) <= MAX_PLAINTEXT_BYTES:
                        parts.append(self.pending.popleft())
                        size += len(parts[-1])
                    self.pending_bytes -= size
                    await self.ws.send_bytes(self.cipher.seal(b"".join(parts)))
        except (ConnectionError, aiohttp.ClientError):
            self.close()


class Links:
    """This replica's links: dialling the members it should, accepting the others."""

    def __init__(self, hub: RelayHub, replica, registry: CollectorRegistry):
        self.hub, self.replica, self.config = hub, replica, replica.config
        self._dials: dict[str, asyncio.Task] = {}
        Gauge("raftmesh_relay_links", "Proven relay links to other replicas",
              registry=registry).set_function(lambda: len(hub.links))
        frames = Counter("raftmesh_relay_link_frames", "Relay frames that arrived over links, by "
                         "outcome (delivered to a session here, or dropped)", ["outcome"], registry=registry)
        self.delivered, self.dropped = frames.labels("delivered"), frames.labels("dropped")
        self.refused = Counter("raftmesh_relay_links_refused", "Relay link handshakes or messages "
                               "refused (not a member, bad proof, failed authentication)", registry=registry)

    @cached_property
    def key(self) -> bytes:
        return link_key(self.config.cluster_secret)

    def members(self) -> set[str]:
        """The other current Raft members' addresses."""
        return set(self.replica.status.get("members", ())) - {self.config.raft_addr}

    async def run(self) -> None:
        """Dial the members after this one in address order; close links to non-members."""
        await asyncio.to_thread(lambda: self.key)
        try:
            async with aiohttp.ClientSession() as http:
                while True:
                    members = self.members()
                    for peer, link in list(self.hub.links.items()):
                        if peer not in members:
                            link.close()
                    urls = member_api_urls(self.replica.store)
                    for peer in sorted(members):
                        if (peer > self.config.raft_addr and urls.get(peer)
                                and peer not in self.hub.links and peer not in self._dials):
                            self._dials[peer] = asyncio.create_task(self._dial(http, peer, urls[peer]))
                    await asyncio.sleep(RECONCILE)
        finally:
            for task in self._dials.values():
                task.cancel()
            for link in list(self.hub.links.values()):
                link.close()

    async def _dial(self, http: aiohttp.ClientSession, peer: str, url: str) -> None:
        me, nonce = self.config.raft_addr, os.urandom(NONCE_BYTES)
        ws = None
        try:
            try:
                ws = await http.ws_connect(url.rstrip("/") + LINK_PATH, heartbeat=HEARTBEAT,
                                           headers={HEADER_FROM: me, HEADER_NONCE: nonce.hex()},
                                           max_msg_size=MAX_MESSAGE_BYTES, autoping=True,
                                           timeout=aiohttp.ClientWSTimeout(ws_close=1.0))
                first = await ws.receive(timeout=HANDSHAKE_TIMEOUT)
                if first.type != WSMsgType.BINARY or len(first.data) != NONCE_BYTES + PROOF_BYTES:
                    raise LinkError("no handshake from the replica")
                theirs = first.data[:NONCE_BYTES]
                check_proof(first.data[NONCE_BYTES:], self.key, "acceptor", me, peer, nonce, theirs)
                await ws.send_bytes(proof(self.key, "dialer", me, peer, nonce, theirs))
            except LinkError as e:
                self.refused.inc()
                log.warning("relay link to %s refused: %s", peer, e)
                return
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                log.debug("relay link to %s: %s", peer, e)
                return
            await self.serve(Link(peer, ws, LinkCipher(self.key, nonce, theirs, dialing=True), self))
        finally:
            if ws is not None:
                await ws.close()
            del self._dials[peer]

    async def serve(self, link: Link) -> None:
        old = self.hub.links.get(link.peer)
        self.hub.links[link.peer] = link  # a replica that restarted replaces its old link
        if old is not None:
            old.close()
        log.info("relay link to %s up", link.peer)
        try:
            await link.run(self.hub)
        finally:
            if self.hub.links.get(link.peer) is link:
                del self.hub.links[link.peer]
            log.info("relay link to %s down", link.peer)


LINKS = web.AppKey("relay_links", Links)


@route("GET", LINK_PATH, None, "Relay link from another replica (WebSocket between current Raft "
       "members, proven and sealed with the cluster secret; docs/deployment.md)", status=101,
       response=RELAY_LINK, response_type="application/octet-stream")
async def relay_link(ctx: Ctx):
    links = ctx.request.app[LINKS]
    peer = ctx.request.headers.get(HEADER_FROM, "")
    try:
        nonce = bytes.fromhex(ctx.request.headers.get(HEADER_NONCE, ""))
    except ValueError:
        nonce = b""
    if len(nonce) != NONCE_BYTES:
        raise APIError(400, "bad_request", f"{HEADER_NONCE} must be {NONCE_BYTES} bytes in hex")
    if peer not in links.members():
        links.refused.inc()
        raise APIError(403, "forbidden", f"{peer!r} is not a Raft member of this cluster")
    me, ours = links.config.raft_addr, os.urandom(NONCE_BYTES)
    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, heartbeat=HEARTBEAT, compress=False)
    await ws.prepare(ctx.request)
    await ws.send_bytes(ours + proof(links.key, "acceptor", peer, me, nonce, ours))
    try:
        answer = await ws.receive(timeout=HANDSHAKE_TIMEOUT)
        if answer.type != WSMsgType.BINARY:
            raise LinkError("no proof from the dialler")
        check_proof(answer.data, links.key, "dialer", peer, me, nonce, ours)
    except (LinkError, asyncio.TimeoutError) as e:
        links.refused.inc()
        log.warning("relay link from %s refused: %s", peer, e or "no proof in time")
        await ws.close()
        return ws
    await links.serve(Link(peer, ws, LinkCipher(links.key, nonce, ours, dialing=False), links))
    return ws
