"""The map stream: one long HTTP response per agent, of authenticated netmap frames.

Every replica runs a StreamHub fed by its own applied commands (cluster/netmap_feed.py),
so a follower serves streams from its applied state and all replicas agree on what each
version means. The first frame is the full netmap, or only what changed since the version
the agent already holds; then deltas as commands apply, a keepalive every
`stream_keepalive` seconds, and a `bye` when the node is revoked (its stream closes on
every replica in the same applied batch that removes it from its peers).

Threading: apply and reset listeners run on the Raft thread and hand batches to the event
loop, which owns the streams and sockets. The feed lives on its own thread (every access
goes through a one-thread executor, in order), so a large change — a policy change at
10,000 nodes — never stalls keepalives or other streams on the loop.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import time
from collections import deque
from typing import Awaitable

from aiohttp import web
from prometheus_client import Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from raftmesh.cluster import dns_config, state_machine as sm
from raftmesh.cluster.commands import ClockTick, NodePresence, NodePresenceSweep
from raftmesh.cluster.netmap_feed import FeedUpdate, NetmapFeed
from raftmesh.cluster.raft import Outcome, Raft
from raftmesh.storage.state_store import read_version
from raftmesh.proto.routes import (BYE_REVOKED, BYE_SHUTTING_DOWN, FRAME_CONTENT_TYPE, HEADER_KEEPALIVE,
                                   HEADER_REPLICA, HEADER_STUN_PORT, HEADER_ACK_PORT)
from raftmesh.proto.wire import Netmap, NetmapDelta

from raftmesh.proto.frames import (ClusterKey, FrameSigner, encode_body, endorse, key_exchange_offer,
                     next_frame, replica_tag_key, stream_keypair)
from . import memtrace
from .gc_tuning import GcTuning

log = logging.getLogger("raftmesh.map_stream")
PRESENCE_WINDOW = 0.5  # stream opens/closes within this window become one Raft write
MAX_QUEUED_FRAMES = 64  # a slower reader gets one full netmap instead of a backlog
WRITE_TIMEOUT = 30.0  # a reader that takes no bytes this long is dropped
MAX_PENDING_ACKS = 1024  # deltas awaiting an ack per stream; the oldest are forgotten
KEEPALIVE_TICKS = 8  # the keepalive timer's ticks per keepalive period


def keepalive_quiet_limits(period: float) -> tuple[float, ...]:
    """How long a stream may stay quiet before its keepalive, by its session's hash: half
    the period plus 0-3 ticks, so at most the period with the tick it waits for. Streams go
    quiet together (a policy change sends every stream a delta), and every frame is made
    for its stream (nonce, seq): on a stream without a stream key each keepalive is an
    Ed25519 signature on the replica and a verification on the agent, so they are spread
    over four ticks, not sent in one burst of 10,000 that drifted into the next change's
    window (docs/benchmarks.md, propagation)."""
    tick = period / KEEPALIVE_TICKS
    return tuple(period / 2 + k * tick for k in range(4))


def quiet_limit(limits: tuple[float, ...], session: str) -> float:
    """The stream's own limit among `limits`, fixed for its life by its session."""
    return limits[hash(session) % len(limits)]


EMPTY_BODY = encode_body({})  # a keepalive's
NO_FRAMES: tuple = ()  # a stream's frames and pending acks before it has any (see Stream)
NO_PENDING: tuple = ()


class Stream:
    """One connected agent on this replica: frames waiting to be written, and its acks.

    Kept small, since a replica holds one per connected agent (docs/benchmarks.md,
    stream-memory): slots instead of a dict, no Event (a future exists only while the
    stream's writer waits), and the frame list and the pending-ack deque exist only while
    they hold something (the hub's keepalive ticker drops a drained deque)."""

    __slots__ = ("node_id", "remote", "nonce", "seq", "tag_key", "key_exchange", "signed_by",
                 "session", "connected_at", "frames", "needs_full", "closing", "sent_version",
                 "last_sent", "keepalive_due", "acked_version", "acked_at", "pending",
                 "_woken", "_waiter", "resp", "transport")

    def __init__(self, node_id: str, remote: str | None, nonce: str):
        self.node_id, self.remote = node_id, remote
        self.nonce, self.seq = nonce, 0  # every frame carries both (AgentNetmap.begin_stream)
        # With a stream key from the agent: the key frames are tagged with, and the offer its
        # first frame carries (then dropped). `signed_by`: the signer of the last signed
        # frame; a new cluster key gets one signed frame of its own (frames.next_frame).
        self.tag_key: bytes | None = None
        self.key_exchange: dict | None = None
        self.signed_by: FrameSigner | None = None
        self.session = secrets.token_hex(8)
        self.connected_at = time.time()
        self.frames: list[tuple[str, int, bytes]] | tuple = NO_FRAMES  # bodies encoded
        self.needs_full = False
        self.closing: dict | None = None
        self.sent_version = 0
        self.last_sent = time.monotonic()
        self.keepalive_due = False
        self.acked_version: int | None = None
        self.acked_at: float | None = None
        # (version, cause time, revoke) per delta sent and not yet acked; NO_PENDING (an
        # empty tuple: falsy, so readers see an empty queue) until the first delta.
        self.pending: deque[tuple[int, float, bool]] | tuple = NO_PENDING
        self._woken = False
        self._waiter: asyncio.Future | None = None
        # Its response and connection once the first frame is out: from then on, a frame
        # for a parked stream is written by whoever has it (StreamHub.write_now).
        self.resp: web.StreamResponse | None = None
        self.transport: asyncio.Transport | None = None

    def parked(self) -> bool:
        """Its writer waits for a wake-up with nothing queued or due: a frame written for it
        now goes out in order."""
        waiter = self._waiter
        return (waiter is not None and not waiter.done() and not self.frames
                and not self.needs_full and self.closing is None and not self.keepalive_due)

    def push(self, kind: str, version: int, body: bytes) -> None:
        if self.frames is NO_FRAMES:
            self.frames = []
        self.frames.append((kind, version, body))
        if len(self.frames) > MAX_QUEUED_FRAMES:
            self.frames = NO_FRAMES
            self.needs_full = True
        self.wake()

    def expect_ack(self, version: int, cause: float, revoke: bool) -> None:
        if self.pending is NO_PENDING:
            self.pending = deque(maxlen=MAX_PENDING_ACKS)
        self.pending.append((version, cause, revoke))

    def take_frames(self) -> list[tuple[str, int, bytes]] | tuple:
        frames, self.frames = self.frames, NO_FRAMES
        return frames

    def close(self, code: str, message: str) -> None:
        self.closing = {"code": code, "message": message}
        self.wake()

    def wake(self) -> None:
        """Wake the stream's writer (now, or at its next wait): frames, a close, a keepalive."""
        self._woken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until wake() was called since the last wait() returned (like Event.wait + clear)."""
        if not self._woken:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self._woken = False

    def info(self, replica_id: str) -> dict:
        return {"node_id": self.node_id, "replica": replica_id, "session": self.session,
                "connected_at": self.connected_at, "remote": self.remote,
                "sent_version": self.sent_version, "acked_version": self.acked_version,
                "acked_at": self.acked_at}


class StreamHub:
    def __init__(self, replica: Raft, registry):
        self.replica = replica
        self.feed: NetmapFeed | None = None
        self.signer: FrameSigner | None = None
        self.stream_keys = stream_keypair()  # this process's X25519 pair for stream tag keys
        # node -> its streams here: a tuple, as it is nearly always one (a set costs 200 bytes)
        self.streams: dict[str, tuple[Stream, ...]] = {}
        self._tagged: dict[str, Stream] = {}  # stream nonce -> its stream, if it has a tag key
        self.acks: dict[str, tuple[int, float]] = {}  # node -> latest acked version, when
        self._waiters: list[tuple[int, asyncio.Future]] = []
        self._tasks: list[asyncio.Task] = []
        self._ticked_for: float | None = None
        self._feed_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="netmap-feed")
        self._feed_thread_stopped = False
        self._feed_jobs = 0  # queued or running on the feed thread (loop's count; see _on_batch)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._presence: list[dict] = []
        self._presence_wake: asyncio.Event | None = None
        self.propagation = Histogram(
            "raftmesh_netmap_propagation_seconds",
            "from the command that changed a netmap to the agent acknowledging it",
            registry=registry, buckets=(.01, .025, .05, .1, .25, .5, 1, 2, 5, 10, 30))
        self.revoke = Histogram(
            "raftmesh_revoke_seconds",
            "from a node's revocation (delete/expiry) to each peer acknowledging its removal",
            registry=registry, buckets=(.01, .025, .05, .1, .25, .5, 1, 1.5, 2, 5, 10, 30))
        self.setup = Histogram(
            "raftmesh_connect_setup_seconds",
            "agents' reported time from a peer's first appearance in their netmap to the first "
            "WireGuard handshake with it (direct or relayed)",
            registry=registry, buckets=(.05, .1, .25, .5, 1, 2, 5, 10, 30))
        self.paths: dict[str, tuple[int, int]] = {}  # node -> (direct, relayed) peers, as acked
        paths = Gauge("raftmesh_agent_peer_paths", "peers of the agents streaming here, by the "
                      "path their last ack reported", ["kind"], registry=registry)
        for i, kind in enumerate(("direct", "relay")):
            paths.labels(kind).set_function(lambda i=i: sum(
                p[i] for n, p in self.paths.items() if n in self.streams))
        registry.register(_StreamCollector(self))

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self._presence_wake = asyncio.Event()
        # RAFTMESH_TRACEMALLOC=1: tracemalloc on, SIGUSR2 dumps a snapshot (docs/deployment.md)
        self.memtrace = memtrace.install(self.replica.config.data_dir, loop, lambda: {
            "streams": sum(len(s) for s in self.streams.values())})
        self.replica.add_apply_listener(self._on_batch, loop)
        self.replica.add_reset_listener(lambda: loop.call_soon_threadsafe(self._on_reset))
        self.feed = self._build_feed()
        self._load_keys()
        self._tasks.append(loop.create_task(self._expiry_timer()))
        self._tasks.append(loop.create_task(self._presence_writer()))
        self._tasks.append(loop.create_task(self._keepalive_ticker()))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for streams in list(self.streams.values()):
            for s in streams:
                s.close(BYE_SHUTTING_DOWN, "replica is shutting down; reconnect to another")
        self._feed_thread_stopped = True
        self._feed_thread.shutdown(wait=False, cancel_futures=True)

    def _build_feed(self) -> NetmapFeed:
        """Derive everything from the local state: at start and after a snapshot install."""
        with self.replica.store.read() as txn:
            version = read_version(txn)
            head = txn.get("meta", "policy_head")
            policy = txn.get("policy_versions", f"{head['version']:010d}") if head else None
            nodes = [n for _, n in txn.items("nodes")]
            clock = sm.clock(txn)
            dns = dns_config.stored_settings(txn)
        # Filters are derived for the nodes streaming here only (watched when their first
        # netmap is computed, unwatched when their last stream ends): see NetmapIndex.watch.
        return NetmapFeed(policy, nodes, clock, version, hooks=GcTuning(), dns=dns,
                          watch_all=False)

    def _on_reset(self) -> None:
        def rebuild():
            feed = self._build_feed()
            self._loop.call_soon_threadsafe(self._install_feed, feed)
        self._submit(_logged(rebuild))

    def _submit(self, fn, *args) -> concurrent.futures.Future:
        """Run `fn` on the feed thread, counted in _feed_jobs until the loop hears it ended
        (after anything the job itself scheduled on the loop: call_soon_threadsafe is FIFO)."""
        self._feed_jobs += 1
        fut = self._feed_thread.submit(fn, *args)
        fut.add_done_callback(self._job_ended)
        return fut

    def _job_ended(self, _fut) -> None:
        try:
            self._loop.call_soon_threadsafe(self._count_job_ended)
        except RuntimeError:
            pass  # the loop is closed: shutting down

    def _count_job_ended(self) -> None:
        self._feed_jobs -= 1

    def _install_feed(self, feed: NetmapFeed) -> None:
        self.feed = feed
        self._load_keys()
        unserved = self.unserved_reason()
        for streams in self.streams.values():
            for s in streams:
                if unserved is not None:  # never its deny-all placeholder: agents go elsewhere
                    s.close("not_ready", unserved)
                    continue
                s.frames = NO_FRAMES
                s.needs_full = True
                s.wake()
        self._wake_waiters()

    def unserved_reason(self) -> str | None:
        """Why this replica has no netmaps to serve (built from a policy it cannot interpret)."""
        feed = self.feed
        if feed is None or feed.serving:
            return None
        return f"{feed.policy_problem}; use another replica"

    async def on_feed(self, fn, *args):
        """Run `fn(feed, *args)` on the feed's thread, after every batch handed to it so far."""
        return await asyncio.wrap_future(self._submit(lambda: fn(self.feed, *args)))

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
        """Batches that cannot change a netmap (users, keys, audit... the bulk of admin
        writes) are applied right here when the feed thread is idle: all they do is move
        the feed's version and clock, and a hand-off to the thread and back for each cost
        ~7% of a replica's CPU per write (`raftmesh bench writes`). Anything else, or any
        batch while the thread has work, goes through the thread, in order."""
        feed = self.feed
        if self._feed_jobs == 0 and feed is not None and feed.apply_if_only_time(batch):
            self._wake_waiters()
            return
        self._submit(_logged(self._apply_batch), batch)

    def _apply_batch(self, batch) -> None:
        """On the feed thread: derive the deltas and encode their bodies (encode_deltas),
        then hand them to the loop (in order: one thread, FIFO call_soon_threadsafe)."""
        started = time.perf_counter()
        update = self.feed.apply_batch(batch)
        bodies = encode_deltas({k: d for k, d in update.deltas.items()
                                if k in self.streams and k not in update.gone})
        reasons = {k: "node was deleted" if not self.feed.index.knows(k) else
                   "node key expired or node is no longer approved; re-authenticate"
                   for k in update.gone}
        elapsed = time.perf_counter() - started
        if elapsed > 0.5:
            log.warning("netmap batch at version %d took %.2fs for %d deltas", update.version,
                        elapsed, len(update.deltas))
        self._loop.call_soon_threadsafe(self._fan_out, update, bodies, reasons)

    def _fan_out(self, update: FeedUpdate, bodies: dict, reasons: dict) -> None:
        """Write each delta straight to the streams whose writers are parked, all in this
        one turn of the loop (write_now), and queue it for the others."""
        if update.keys_changed:
            self._load_keys()
        now = time.monotonic()
        for node_id, delta in update.deltas.items():
            streams = self.streams.get(node_id)
            if not streams or node_id in update.gone:
                continue
            body = bodies.get(node_id) or encode_body(delta.to_json())  # a stream opened meanwhile
            revoke = bool(update.gone.intersection(delta.peers_removed))
            for s in streams:
                if not self.write_now(s, "delta", delta.version, body, now):
                    s.push("delta", delta.version, body)
                s.expect_ack(delta.version, update.cause_time.get(node_id, 0.0), revoke)
        for node_id in update.gone:
            for s in self.streams.get(node_id, ()):
                s.close(BYE_REVOKED, reasons[node_id])
        self._wake_waiters()

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

    async def catch_up(self, replica: Raft, timeout: float) -> bool:
        """A read barrier, then every batch before it through the feed; False on timeout.
        Batches reach the loop before futures resolve (Raft.add_apply_listener), so
        they are queued on the feed thread ahead of the no-op awaited here."""
        try:
            outcome = await asyncio.wait_for(asyncio.wrap_future(replica.barrier()), timeout)
        except asyncio.TimeoutError:
            return False
        if outcome.kind != Outcome.APPLIED:
            return False
        await self.on_feed(lambda feed: None)  # the batches before the barrier are applied
        return True

    async def _keepalive_ticker(self) -> None:
        """One timer for all streams instead of a timed wait (a task and a timer) in each:
        every tick, wake the streams quiet for longer than their limit
        (keepalive_quiet_limits). Saves memory per idle stream. Also drops the pending-ack
        deques that acks drained, so a quiet stream holds none."""
        period = self.replica.config.stream_keepalive
        limits = keepalive_quiet_limits(period)
        while True:
            await asyncio.sleep(period / KEEPALIVE_TICKS)  # a periodic timer, not synchronisation
            now = time.monotonic()
            for streams in list(self.streams.values()):
                for s in streams:
                    if not s.pending and s.pending is not NO_PENDING:
                        s.pending = NO_PENDING
                    if now - s.last_sent >= quiet_limit(limits, s.session) and \
                            not self.write_now(s, "keepalive", s.sent_version, EMPTY_BODY, now):
                        s.keepalive_due = True
                        s.wake()

    async def _expiry_timer(self) -> None:
        """Key expiry needs the replicated clock to pass it; with no other writes, the
        leader proposes a clock tick when the next expiry is due."""
        while True:
            nxt = self.feed.next_expiry() if self.feed else None
            now = time.time()
            if (nxt is not None and nxt <= now and self._ticked_for != nxt
                    and self.replica.status.get("state") == "leader"):
                self._ticked_for = nxt
                fut = self.replica.propose(ClockTick(time=now,
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
    def subscribe(self, node_id: str, remote: str | None, nonce: str,
                  agent_stream_key: bytes | None = None) -> Stream:
        """`agent_stream_key`: the agent's X25519 public key for this stream (FrameError if
        unusable); its frames after the first are then tagged, not signed."""
        s = Stream(node_id, remote, nonce)
        if agent_stream_key is not None:
            s.tag_key = replica_tag_key(self.stream_keys, agent_stream_key)
            s.key_exchange = key_exchange_offer(agent_stream_key, self.stream_keys[0])
        self.streams[node_id] = self.streams.get(node_id, ()) + (s,)
        if s.tag_key is not None:
            self._tagged[nonce] = s
        return s

    def unsubscribe(self, s: Stream) -> None:
        streams = self.streams.get(s.node_id)
        if streams is not None and s in streams:
            if self._tagged.get(s.nonce) is s:
                del self._tagged[s.nonce]
            rest = tuple(x for x in streams if x is not s)
            if rest:
                self.streams[s.node_id] = rest
            else:
                del self.streams[s.node_id]
                if self._loop is not None and not self._feed_thread_stopped:
                    self._submit(_logged(self._unwatch), s.node_id)

    def _unwatch(self, node_id: str) -> None:
        """On the feed thread, after the node's last stream here ended: unless another has
        opened meanwhile (its first netmap watches it again anyway), stop deriving its
        filter. Jobs run in order, so a later stream's first netmap comes after this."""
        feed = self.feed
        if feed is not None and node_id not in self.streams:
            feed.unwatch(node_id)

    def ack(self, node_id: str, version: int, applied: list | None = None) -> bool:
        """An agent applied everything up to `version`: record it and observe propagation
        and revoke times. Agents coalesce and defer acks off the delivery path, so an ack
        may cover several versions; `applied` gives, per version, how many seconds ago the
        agent applied it (its own monotonic clock: no clock sync needed). A pending change
        counts as applied when the first listed version at or after it was."""
        now = time.time()
        prev = self.acks.get(node_id)
        if prev is None or version > prev[0]:
            self.acks[node_id] = (version, now)
        ages = sorted((v, a) for v, a in (applied or ()) if v <= version)
        for s in self.streams.get(node_id, ()):
            if s.acked_version is None or version > s.acked_version:
                s.acked_version, s.acked_at = version, now
            while s.pending and s.pending[0][0] <= version:
                pending_version, cause, revoke = s.pending.popleft()
                if cause:
                    age = next((a for v, a in ages if v >= pending_version), 0.0)
                    took = max(0.0, now - age - cause)
                    self.propagation.observe(took)
                    if revoke:
                        self.revoke.observe(took)
        return node_id in self.streams

    def stream_by_nonce(self, nonce: str) -> Stream | None:
        """The stream opened here by the map request with `nonce`, if it has a tag key
        (what an ack datagram names, proto/ack_datagram.py)."""
        return self._tagged.get(nonce)

    def report_paths(self, node_id: str, paths: dict | None, setup: list | None) -> None:
        """What an agent's ack says about its peers' paths (protocol version 2)."""
        if paths is not None:
            self.paths[node_id] = (paths["direct"], paths["relay"])
        for seconds in setup or ():
            self.setup.observe(seconds)

    def stream_info(self, node_id: str | None = None) -> list[dict]:
        rid = self.replica.config.id
        out = []
        for nid in sorted(self.streams) if node_id is None else [node_id]:
            paths = self.paths.get(nid)
            reported = None if paths is None else {"direct": paths[0], "relay": paths[1]}
            out.extend({**s.info(rid), "paths": reported} for s in self.streams.get(nid, ()))
        return out

    # -- writing one stream ----------------------------------------------------------------------
    async def open_stream(self, node_id: str, remote: str | None, since: int | None,
                          nonce: str, agent_stream_key: bytes | None = None
                          ) -> tuple[Stream | None, Netmap | object | None]:
        """Subscribe, then compute the first netmap or delta: (stream, first), or (None,
        None) when the node is not visible here. In this order a batch applied after `first`
        was computed reaches the stream as a queued frame (skipped by version if `first`
        covers it). Computed first and subscribed later, such a batch could be fanned out in
        between and never reach the agent: a chaos run caught an agent that resumed while a
        node was deleted keeping that node as a peer for good."""
        stream = self.subscribe(node_id, remote, nonce, agent_stream_key)
        try:
            first = await self.on_feed(lambda feed: _watched_resume(feed, node_id, since))
        except BaseException:
            self.unsubscribe(stream)
            raise
        if first is None:
            self.unsubscribe(stream)
            return None, None
        return stream, first

    async def serve(self, request: web.Request, start: Awaitable[tuple[Stream, Netmap | object]],
                    keepalive: float) -> web.StreamResponse:
        """One agent's stream. `start` checks the request (raising the refusal) and gives
        the stream open_stream subscribed and the first netmap or delta, of which serve
        holds the only reference."""
        stream, first = await start
        del start
        node_id = stream.node_id
        try:
            resp = web.StreamResponse(headers={"Content-Type": FRAME_CONTENT_TYPE,
                                               "Cache-Control": "no-store",
                                               HEADER_REPLICA: self.replica.config.id,
                                               HEADER_KEEPALIVE: f"{keepalive:g}",
                                               HEADER_STUN_PORT: str(self.replica.config.stun_udp_port),
                                               HEADER_ACK_PORT: str(self.replica.config.stun_udp_port)})
            await resp.prepare(request)
            # prepare() serialised the head for sending; the header dict would otherwise stay
            # allocated for the stream's life (~0.9 KB each, with aiohttp's Date and Server)
            resp.headers.clear()
            self._presence_change(node_id, True, stream.session)
            try:
                kind = "full" if isinstance(first, Netmap) else "delta"
                version, body = first.version, encode_body(first.to_json())
                del first  # the caller hands over its only reference: not kept while streaming
                await self._send(resp, stream, kind, version, body)
                del body
                stream.resp, stream.transport = resp, request.transport
                while stream.closing is None:
                    await stream.wait()  # frames, a close, or the hub's keepalive ticker
                    await self._write_due(resp, stream)
                await self._send(resp, stream, "bye", stream.sent_version,
                                 encode_body(stream.closing))
            except (ConnectionError, asyncio.TimeoutError, RuntimeError) as e:
                log.debug("stream of %s ended: %r", node_id, e)
            finally:
                stream.resp = stream.transport = None
                self._presence_change(node_id, False, stream.session)
        finally:
            self.unsubscribe(stream)
        return resp

    async def _write_due(self, resp: web.StreamResponse, stream: Stream) -> None:
        """After a wake-up: a keepalive, a full netmap or the queued deltas. A method of its
        own so that the frames it writes are not kept alive by serve() until the next one."""
        if stream.keepalive_due:
            stream.keepalive_due = False
            if not stream.frames and not stream.needs_full and stream.closing is None:
                await self._send(resp, stream, "keepalive", stream.sent_version, EMPTY_BODY)
        if stream.needs_full and stream.closing is None:
            stream.needs_full = False
            node_id = stream.node_id
            full = await self.on_feed(lambda feed: _encoded_full(feed, node_id))
            if full is None:
                stream.close(BYE_REVOKED, "node is no longer part of the mesh")
            else:
                await self._send(resp, stream, "full", *full)
        for kind, version, body in stream.take_frames():
            if version > stream.sent_version:
                await self._send(resp, stream, kind, version, body)

    async def _send(self, resp: web.StreamResponse, stream: Stream, kind: str, version: int,
                    body: bytes) -> None:
        if self.signer is None:
            raise RuntimeError("no cluster signing key yet")
        # seq moves on before the write: a frame cut short by a failed write ends the stream
        data = next_frame(self.signer, stream, kind, version, body)
        async with asyncio.timeout(WRITE_TIMEOUT):  # (no wrapping task per frame, as wait_for)
            await resp.write(data)
        _sent(stream, kind, version, time.monotonic())

    def write_now(self, stream: Stream, kind: str, version: int, body: bytes, now: float) -> bool:
        """Write a frame for a parked stream from the caller's turn of the loop; False (and
        nothing done) when the stream's writer must send it: it is busy or has frames
        queued, its connection has unsent bytes, or there is no signing key.

        A delta fanned out to 10,000 streams was 10,000 writer wake-ups (a future, a task
        step, a timer for the write timeout each) around 10,000 socket writes; written here,
        it is the writes alone (docs/benchmarks.md, propagation). aiohttp's write is a
        coroutine that only suspends to wait for a congested connection to drain, which one
        with nothing unsent cannot be before this write: it is stepped once, and if the
        frame itself filled the buffer, the frame is out and the stream's writer, which
        awaits its writes, waits for the drain on its next frame."""
        transport = stream.transport
        if (transport is None or self.signer is None or not stream.parked()
                or transport.is_closing() or transport.get_write_buffer_size()):
            return False
        if kind == "delta" and version <= stream.sent_version:
            return True  # the stream already has it (its first frame was computed later)
        step = stream.resp.write(next_frame(self.signer, stream, kind, version, body))
        try:
            step.send(None)
        except StopIteration:
            pass
        except (ConnectionError, RuntimeError):  # its writer ends the stream on its next write
            stream.keepalive_due = True
            stream.wake()
            return True
        else:
            step.close()
        _sent(stream, kind, version, now)
        return True

    def _presence_change(self, node_id: str, online: bool, session: str) -> None:
        self._presence.append({"id": node_id, "online": online, "session": session})
        self._presence_wake.set()

    async def _presence_writer(self) -> None:
        """Online/offline into the replicated node records, one command per window: a
        reconnect storm of thousands of agents is a few Raft writes, and peers get one
        delta per window instead of one per agent (best effort: a replica that dies with
        open streams sweeps them when it starts again)."""
        me = self.replica.config.id
        while True:
            await self._presence_wake.wait()
            await asyncio.sleep(PRESENCE_WINDOW)  # the coalescing window, not synchronisation
            self._presence_wake.clear()
            changes, self._presence = self._presence, []
            cmd = NodePresence(replica=me, changes=changes, time=time.time(), actor=f"replica:{me}")
            try:
                outcome = await asyncio.wait_for(asyncio.wrap_future(self.replica.propose(cmd)), 10)
                ok = outcome.kind == Outcome.APPLIED
            except asyncio.TimeoutError:
                ok = False
            if not ok:  # re-applying a presence change is harmless; try again next window
                self._presence[:0] = changes
                self._presence_wake.set()
                await asyncio.sleep(1.0)


def _sent(stream: Stream, kind: str, version: int, now: float) -> None:
    stream.last_sent = now
    if kind in ("full", "delta"):
        stream.sent_version = version


def encode_deltas(deltas: dict[str, NetmapDelta]) -> dict[str, bytes]:
    """Each node's delta body as frame bytes, encoded once per delta object: the index
    hands every peer of a changed node the same delta (a new endpoint to 10,000 peers is one
    encoding shared by all of their frames). By identity, not by value: hashing each
    delta's contents cost more than it saved where every delta differs (a packet filter
    naming each node's own addresses)."""
    out: dict[str, bytes] = {}
    seen: dict[int, bytes] = {}  # id(delta): they all stay alive in `deltas` meanwhile
    for node_id, d in deltas.items():
        body = seen.get(id(d))
        if body is None:
            body = seen[id(d)] = encode_body(d.to_json())
        out[node_id] = body
    return out


def _watched_resume(feed: NetmapFeed, node_id: str, since: int | None
                    ) -> Netmap | NetmapDelta | None:
    """On the feed thread: a stream's first netmap or delta; its deltas carry its filter
    from now on (it may be on a feed other than the one its stream last watched it on)."""
    feed.watch(node_id)
    return feed.resume(node_id, since)


def _encoded_full(feed: NetmapFeed, node_id: str) -> tuple[int, bytes] | None:
    """On the feed thread: a stream's full netmap as (version, body bytes), None if gone;
    watched, as by _watched_resume."""
    feed.watch(node_id)
    full = feed.full(node_id)
    return None if full is None else (full.version, encode_body(full.to_json()))


def _logged(fn):
    def run(*args):
        try:
            fn(*args)
        except Exception:
            log.exception("netmap feed task failed")
    return run


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
        g = GaugeMetricFamily("raftmesh_policy_unreadable", "1 while this replica cannot "
                              "interpret the newest stored policy (see /readyz)")
        g.add_metric([], bool(feed and feed.policy_problem))
        yield g


async def sweep_presence(replica: Raft) -> None:
    """After a restart, mark the streams this replica served before as gone."""
    me = replica.config.id
    with replica.store.read() as txn:
        stale = any(n.get("online") and n.get("stream_replica") == me for _, n in txn.items("nodes"))
    if not stale:
        return
    cmd = NodePresenceSweep(replica=me, time=time.time(), actor=f"replica:{me}")
    for _ in range(20):
        try:
            outcome = await asyncio.wait_for(asyncio.wrap_future(replica.propose(cmd)), 5)
            if outcome.kind == Outcome.APPLIED:
                return
        except asyncio.TimeoutError:
            pass
        await asyncio.sleep(0.5)
