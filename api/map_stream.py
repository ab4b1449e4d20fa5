"""The map stream: one long HTTP response per agent, of signed netmap frames.

Every replica runs a StreamHub fed by its own applied commands (cluster/netmap_feed.py),
so a follower serves streams from its applied state and all replicas agree on what each
version means. The first frame is the full netmap, or only what changed since the version
the agent already holds; then deltas as commands apply, a keepalive every
`stream_keepalive` seconds, and a `bye` when the node is revoked (its stream closes on
every replica in the same applied batch that removes it from its peers).

Threading: apply and reset listeners run on the Raft thread and only hand batches to the
event loop, which owns the feed, the streams and all sockets.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque

from aiohttp import web
from prometheus_client import Histogram
from prometheus_client.core import GaugeMetricFamily

from raftmesh.cluster import state_machine as sm
from raftmesh.cluster.commands import Command
from raftmesh.cluster.netmap_feed import FeedUpdate, NetmapFeed
from raftmesh.cluster.replica import Outcome, RaftReplica
from raftmesh.storage.state_store import read_version
from raftmesh.api.wire import Netmap

from .frames import ClusterKey, FrameSigner, endorse

log = logging.getLogger("raftmesh.map_stream")
MAX_QUEUED_FRAMES = 64  # a slower reader gets one full netmap instead of a backlog
WRITE_TIMEOUT = 30.0  # a reader that takes no bytes this long is dropped
FRAME_CONTENT_TYPE = "application/x-raftmesh-frames"


class Stream:
    """One connected agent on this replica: frames waiting to be written, and its acks."""

    def __init__(self, node_id: str, remote: str | None):
        self.node_id, self.remote = node_id, remote
        self.session = secrets.token_hex(8)
        self.connected_at = time.time()
        self.frames: list[tuple[str, int, dict]] = []
        self.wake = asyncio.Event()
        self.needs_full = False
        self.closing: dict | None = None
        self.sent_version = 0
        self.acked_version: int | None = None
        self.acked_at: float | None = None
        self.pending: deque[tuple[int, float, bool]] = deque(maxlen=1024)  # version, cause, revoke

    def push(self, kind: str, version: int, body: dict) -> None:
        self.frames.append((kind, version, body))
        if len(self.frames) > MAX_QUEUED_FRAMES:
            self.frames.clear()
            self.needs_full = True
        self.wake.set()

    def close(self, code: str, message: str) -> None:
        self.closing = {"code": code, "message": message}
        self.wake.set()

    def info(self, replica_id: str) -> dict:
        return {"node_id": self.node_id, "replica": replica_id, "session": self.session,
                "connected_at": self.connected_at, "remote": self.remote,
                "sent_version": self.sent_version, "acked_version": self.acked_version,
                "acked_at": self.acked_at}


class StreamHub:
    def __init__(self, replica: RaftReplica, registry):
        self.replica = replica
        self.feed: NetmapFeed | None = None
        self.signer: FrameSigner | None = None
        self.streams: dict[str, set[Stream]] = {}
        self.acks: dict[str, tuple[int, float]] = {}  # node -> latest acked version, when
        self._waiters: list[tuple[int, asyncio.Future]] = []
        self._tasks: list[asyncio.Task] = []
        self._ticked_for: float | None = None
        self.propagation = Histogram(
            "raftmesh_netmap_propagation_seconds",
            "from the command that changed a netmap to the agent acknowledging it",
            registry=registry, buckets=(.01, .025, .05, .1, .25, .5, 1, 2, 5, 10, 30))
        self.revoke = Histogram(
            "raftmesh_revoke_seconds",
            "from a node's revocation (delete/expiry) to each peer acknowledging its removal",
            registry=registry, buckets=(.01, .025, .05, .1, .25, .5, 1, 1.5, 2, 5, 10, 30))
        registry.register(_StreamCollector(self))

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.replica.add_apply_listener(lambda b: loop.call_soon_threadsafe(self._on_batch, b))
        self.replica.add_reset_listener(lambda: loop.call_soon_threadsafe(self._rebuild))
        self._rebuild()
        self._tasks.append(loop.create_task(self._expiry_timer()))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for streams in list(self.streams.values()):
            for s in streams:
                s.close("shutting_down", "replica is shutting down; reconnect to another")

    def _rebuild(self) -> None:
        """(Re)derive everything from the local state: at start and after a snapshot install."""
        with self.replica.store.read() as txn:
            version = read_version(txn)
            head = txn.get("meta", "policy_head")
            text = txn.get("policy_versions", f"{head['version']:010d}")["text"] if head else None
            nodes = [n for _, n in txn.items("nodes")]
            clock = sm.clock(txn)
        self.feed = NetmapFeed(text, nodes, clock, version)
        self._load_keys()
        for node_id, streams in self.streams.items():
            for s in streams:
                s.frames.clear()
                s.needs_full = True
                s.wake.set()
        self._wake_waiters()

    def _load_keys(self) -> None:
        with self.replica.store.read() as txn:
            keys = [k for _, k in txn.items("cluster_keys")]
        current = [k for k in keys if k["retire_at"] is None]
        if not current:
            self.signer = None
            return
        cur = current[-1]
        now = time.time()
        new = ClusterKey(cur["id"], cur["public_key"], cur["private_key"])
        endorsements = [endorse(ClusterKey(k["id"], k["public_key"], k["private_key"]), new)
                        for k in keys if k["retire_at"] is not None and k["retire_at"] > now]
        self.signer = FrameSigner(new, endorsements)

    # -- applied commands --------------------------------------------------------------------
    def _on_batch(self, batch) -> None:
        if self.feed is None:
            return
        started = time.perf_counter()
        update = self.feed.apply_batch(batch)
        if update.keys_changed:
            self._load_keys()
        self._fan_out(update)
        self._wake_waiters()
        elapsed = time.perf_counter() - started
        if elapsed > 0.5:
            log.warning("netmap batch at version %d took %.2fs for %d deltas", update.version,
                        elapsed, len(update.deltas))

    def _fan_out(self, update: FeedUpdate) -> None:
        for node_id, delta in update.deltas.items():
            streams = self.streams.get(node_id)
            if not streams or node_id in update.gone:
                continue
            body = delta.to_json()
            revoke = bool(update.gone.intersection(delta.peers_removed))
            for s in streams:
                s.push("delta", delta.version, body)
                s.pending.append((delta.version, update.cause_time.get(node_id, 0.0), revoke))
        for node_id in update.gone:
            reason = ("node was deleted" if not self.feed.index.knows(node_id) else
                      "node key expired or node is no longer approved; re-authenticate")
            for s in self.streams.get(node_id, ()):
                s.close("revoked", reason)

    def _wake_waiters(self) -> None:
        keep = []
        for version, fut in self._waiters:
            if fut.done():
                continue
            if self.feed is not None and self.feed.version >= version:
                fut.set_result(True)
            else:
                keep.append((version, fut))
        self._waiters = keep

    async def wait_version(self, version: int, timeout: float) -> bool:
        if self.feed is not None and self.feed.version >= version:
            return True
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((version, fut))
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            return False

    async def catch_up(self, replica: RaftReplica, timeout: float) -> bool:
        """A read barrier; False if it timed out. Batches are handed to the loop before
        futures resolve (RaftReplica.add_apply_listener), so once the barrier is seen here,
        the feed has every command before it."""
        try:
            outcome = await asyncio.wait_for(asyncio.wrap_future(replica.barrier()), timeout)
        except asyncio.TimeoutError:
            return False
        return outcome.kind == Outcome.APPLIED

    async def _expiry_timer(self) -> None:
        """Key expiry needs the replicated clock to pass it; with no other writes, the
        leader proposes a clock tick when the next expiry is due."""
        while True:
            nxt = self.feed.next_expiry() if self.feed else None
            now = time.time()
            if (nxt is not None and nxt <= now and self._ticked_for != nxt
                    and self.replica.status.get("state") == "leader"):
                self._ticked_for = nxt
                fut = self.replica.propose(Command("clock.tick", {}, time=now,
                                                   actor=f"replica:{self.replica.config.id}"))
                try:
                    outcome = await asyncio.wait_for(asyncio.wrap_future(fut), 5)
                    if outcome.kind != Outcome.APPLIED:
                        self._ticked_for = None
                except asyncio.TimeoutError:
                    self._ticked_for = None
            wait = 1.0 if nxt is None else min(1.0, max(0.05, nxt - now))
            await asyncio.sleep(wait)  # a periodic timer, not synchronisation

    # -- streams -------------------------------------------------------------------------------
    def subscribe(self, node_id: str, remote: str | None) -> Stream:
        s = Stream(node_id, remote)
        self.streams.setdefault(node_id, set()).add(s)
        return s

    def unsubscribe(self, s: Stream) -> None:
        streams = self.streams.get(s.node_id)
        if streams is not None:
            streams.discard(s)
            if not streams:
                del self.streams[s.node_id]

    def ack(self, node_id: str, version: int) -> bool:
        """An agent applied `version`: record it and observe propagation/revoke times."""
        now = time.time()
        prev = self.acks.get(node_id)
        if prev is None or version > prev[0]:
            self.acks[node_id] = (version, now)
        for s in self.streams.get(node_id, ()):
            if s.acked_version is None or version > s.acked_version:
                s.acked_version, s.acked_at = version, now
            while s.pending and s.pending[0][0] <= version:
                _, cause, revoke = s.pending.popleft()
                if cause:
                    self.propagation.observe(max(0.0, now - cause))
                    if revoke:
                        self.revoke.observe(max(0.0, now - cause))
        return node_id in self.streams

    def stream_info(self, node_id: str | None = None) -> list[dict]:
        rid = self.replica.config.id
        out = []
        for nid in sorted(self.streams) if node_id is None else [node_id]:
            out.extend(s.info(rid) for s in self.streams.get(nid, ()))
        return out

    # -- writing one stream ----------------------------------------------------------------------
    async def serve(self, request: web.Request, node_id: str, first: Netmap | object,
                    keepalive: float) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": FRAME_CONTENT_TYPE,
                                           "Cache-Control": "no-store",
                                           "X-Raftmesh-Replica": self.replica.config.id,
                                           "X-Raftmesh-Keepalive": f"{keepalive:g}"})
        await resp.prepare(request)
        stream = self.subscribe(node_id, request.remote)
        presence = asyncio.create_task(self._presence(node_id, True, stream.session))
        try:
            kind = "full" if isinstance(first, Netmap) else "delta"
            await self._send(resp, stream, kind, first.version, first.to_json())
            while stream.closing is None:
                try:
                    await asyncio.wait_for(stream.wake.wait(), keepalive)
                except asyncio.TimeoutError:
                    await self._send(resp, stream, "keepalive", stream.sent_version, {})
                    continue
                stream.wake.clear()
                if stream.needs_full and stream.closing is None:
                    stream.needs_full = False
                    full = self.feed.full(node_id)
                    if full is None:
                        stream.close("revoked", "node is no longer part of the mesh")
                    else:
                        await self._send(resp, stream, "full", full.version, full.to_json())
                frames, stream.frames = stream.frames, []
                for kind, version, body in frames:
                    if version > stream.sent_version:
                        await self._send(resp, stream, kind, version, body)
            await self._send(resp, stream, "bye", stream.sent_version, stream.closing)
        except (ConnectionError, asyncio.TimeoutError, RuntimeError) as e:
            log.debug("stream of %s ended: %r", node_id, e)
        finally:
            self.unsubscribe(stream)
            presence.cancel()
            asyncio.create_task(self._presence(node_id, False, stream.session))
        return resp

    async def _send(self, resp: web.StreamResponse, stream: Stream, kind: str, version: int,
                    body: dict) -> None:
        if self.signer is None:
            raise RuntimeError("no cluster signing key yet")
        data = self.signer.frame(kind, stream.node_id, version, body)
        await asyncio.wait_for(resp.write(data), WRITE_TIMEOUT)
        if kind in ("full", "delta"):
            stream.sent_version = version

    async def _presence(self, node_id: str, online: bool, session: str) -> None:
        """Record online/offline in the replicated node record (best effort: a replica that
        dies with open streams sweeps them when it starts again)."""
        args = {"id": node_id, "online": online, "replica": self.replica.config.id,
                "session": session}
        cmd = Command("node.presence", args, time=time.time(), actor=f"replica:{self.replica.config.id}")
        try:
            await asyncio.wait_for(asyncio.wrap_future(self.replica.propose(cmd)), 10)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            pass


HUB = web.AppKey("map_hub", StreamHub)


class _StreamCollector:
    def __init__(self, hub: StreamHub):
        self.hub = hub

    def collect(self):
        g = GaugeMetricFamily("raftmesh_map_streams", "agent map streams open on this replica")
        g.add_metric([], sum(len(s) for s in self.hub.streams.values()))
        yield g
        feed = self.hub.feed
        g = GaugeMetricFamily("raftmesh_netmap_version", "state version of this replica's netmaps")
        g.add_metric([], feed.version if feed else 0)
        yield g


async def sweep_presence(replica: RaftReplica) -> None:
    """After a restart, mark the streams this replica served before as gone."""
    me = replica.config.id
    with replica.store.read() as txn:
        stale = any(n.get("online") and n.get("stream_replica") == me for _, n in txn.items("nodes"))
    if not stale:
        return
    cmd = Command("node.presence_sweep", {"replica": me}, time=time.time(), actor=f"replica:{me}")
    for _ in range(20):
        try:
            outcome = await asyncio.wait_for(asyncio.wrap_future(replica.propose(cmd)), 5)
            if outcome.kind == Outcome.APPLIED:
                return
        except asyncio.TimeoutError:
            pass
        await asyncio.sleep(0.5)
