"""The relay every replica runs for agents that cannot reach each other directly.

An agent opens a WebSocket on the API port (routes.RELAY: through the same load balancer as
the API), signed with its machine key like every /machine/* request; the replica accepts it
only for an approved node whose key has not expired, and files the session under the node's
WireGuard key. A binary message is a peer's 32-byte WireGuard key and a batch of WireGuard
packets (proto/relay.py); the replica passes it, unparsed, with the sender's key in place of
the destination's, to that peer's session if the peer is connected here, over the relay link
to the replica holding it if it is connected there (api/relay_links.py: sessions need not
meet on one replica), and drops it otherwise. It never sends anywhere but to an
authenticated session, so it cannot be used to reach anything outside the mesh.

What the relay sees (docs/agents.md): which nodes talk to which, when, and how much;
the packets are WireGuard ciphertext, whose contents it cannot read or alter undetected.

Decisions (frame checks, routing) are pure (`route_frame`); the handler does the I/O. Work
per frame is bounded: size checked before anything else, one dict lookup, and a peer whose
session is not reading loses frames instead of growing the replica's buffers.
"""
from __future__ import annotations

import base64
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry, Counter, Gauge

from raftmesh.proto import routes
from raftmesh.proto.relay import KEY_BYTES, MAX_FRAME_BYTES, RelayFrameError, split_frame

from .agent_api import machine_of, node_for_machine
from .errors import APIError
from .relay_link_wire import DOWN, UP
from .responses import RELAY_SESSION
from .routing import Ctx, route

if TYPE_CHECKING:
    from .relay_links import Link

log = logging.getLogger("raftmesh.relay")
MAX_BUFFERED = 1 << 20  # bytes queued to one session before its frames are dropped


class RelayHub:
    """The relay sessions on this replica, by WireGuard key (raw 32 bytes), and the keys
    whose sessions other replicas announced over their links."""

    def __init__(self, registry: CollectorRegistry):
        self.sessions: dict[bytes, Session] = {}
        self.remote: dict[bytes, Link] = {}
        self.links: dict[str, Link] = {}  # by the other replica's Raft address, once proven
        self.frames = Counter("raftmesh_relay_frames", "Relay frames, by outcome", ["outcome"],
                              registry=registry)
        self.relayed, self.dropped, self.refused, self.forwarded = (
            self.frames.labels(o) for o in ("relayed", "dropped", "refused", "forwarded"))
        self.bytes = Counter("raftmesh_relay_bytes", "Relayed WireGuard bytes", registry=registry)
        Gauge("raftmesh_relay_sessions", "Agents' relay sessions on this replica",
              registry=registry).set_function(lambda: len(self.sessions))

    def route_frame(self, sender: bytes, data: bytes) -> tuple["Session | Link | None", bytes | str]:
        """(the destination's session, what to send it), or (the link to the replica holding
        it, a FRAME record's body), or (None, why it is dropped)."""
        try:
            dst, packet = split_frame(data)
        except RelayFrameError as e:
            return None, str(e)
        if dst == sender:
            return None, "destination not connected to this relay"
        session = self.sessions.get(dst)
        if session is not None:
            return session, sender + packet
        link = self.remote.get(dst)
        if link is not None:
            return link, dst + sender + packet
        return None, "destination not connected to this relay"

    def announce(self, kind: int, key: bytes) -> None:
        """Tell every linked replica that this replica's session for `key` opened or closed."""
        for link in list(self.links.values()):
            link.announce(kind, [key])

    async def deliver(self, body: memoryview) -> bool:
        """A FRAME record from a link to its destination's session here; never on to another
        link (one hop), and False (dropped) if the session is not here or is behind."""
        session = self.sessions.get(bytes(body[:KEY_BYTES]))
        out = body[KEY_BYTES:]
        if session is None or session.backlogged(len(out)):
            return False
        try:
            await session.ws.send_bytes(out)  # never waits: backlogged() keeps it under the high water
        except ConnectionError:  # the session is closing
            return False
        return True


class Session:
    __slots__ = ("ws", "transport")

    def __init__(self, ws: web.WebSocketResponse, transport):
        self.ws, self.transport = ws, transport
        if transport is not None:  # a write waits only above MAX_BUFFERED (no hysteresis), so
            # a frame from a link that backlogged() lets through never holds up the link's reader
            transport.set_write_buffer_limits(high=MAX_BUFFERED, low=MAX_BUFFERED)

    def backlogged(self, adding: int = 0) -> bool:
        """Its reader is behind (or gone): frames to it are dropped, not queued."""
        return self.transport is None or self.transport.get_write_buffer_size() + adding > MAX_BUFFERED


HUB = web.AppKey("relay_hub", RelayHub)


@route("GET", routes.RELAY, None, "Relay WireGuard packets to other agents (WebSocket, "
       "signed with the machine key; docs/agents.md)", status=101, response=RELAY_SESSION,
       response_type="application/octet-stream")
async def relay(ctx: Ctx):
    machine = await machine_of(ctx)
    node = node_for_machine(ctx, machine)
    if node is None:  # it may have registered through another replica a moment ago
        await ctx.read_version()
        node = node_for_machine(ctx, machine)
    if node is None:
        raise APIError(404, "not_found", "this machine is not registered (or was deleted)")
    if not node["approved"]:
        raise APIError(403, "pending_approval", f"node {node['id']} waits for an admin to approve it")
    if node.get("expired") or (node.get("key_expiry") is not None and node["key_expiry"] <= time.time()):
        raise APIError(401, "node_expired", f"node {node['id']}'s key has expired")
    key = base64.b64decode(node["node_key"])
    hub = ctx.request.app[HUB]
    ws = web.WebSocketResponse(max_msg_size=MAX_FRAME_BYTES, heartbeat=5.0, compress=False)  # ciphertext
    await ws.prepare(ctx.request)
    session = Session(ws, ctx.request.transport)
    old = hub.sessions.get(key)
    hub.sessions[key] = session  # a reconnect replaces the old session
    hub.announce(UP, key)
    if old is not None:
        await old.ws.close()
    try:
        async for msg in ws:
            if msg.type != WSMsgType.BINARY:
                hub.refused.inc()
                continue
            dst, out = hub.route_frame(key, msg.data)
            if dst is None or dst.backlogged():
                hub.dropped.inc()
            elif isinstance(dst, Session):
                hub.relayed.inc()
                hub.bytes.inc(len(out) - KEY_BYTES)
                await dst.ws.send_bytes(out)
            else:
                hub.forwarded.inc()
                hub.bytes.inc(len(out) - 2 * KEY_BYTES)
                dst.forward(out)
    finally:
        if hub.sessions.get(key) is session:
            del hub.sessions[key]
            hub.announce(DOWN, key)
    return ws
