"""Many protocol-exact agents in a few processes, for the agent-facing benchmarks (issue #5).

A light agent does everything the daemon does on the control-plane side and nothing on the
data plane: its own Ed25519 machine key signing every request (`proto/machine_auth.py`,
fresh timestamp and a unique nonce per request), registration with a pre-auth key, a map
stream (`GET /machine/map?since=V`, with a stream key, so frames after the first are tagged)
whose every frame is verified (against the pinned cluster keys, or the stream's tag key) and
applied, an ack to the replica it streams from, tagged under the stream's key, deferred and
coalesced (a datagram to the port the stream names, `POST /machine/ack` if none is confirmed:
proto/ack_datagram.py), and failover: on EOF, an error, a 5xx or no frame for
twice the keepalive it moves to the next replica URL after a full-jitter exponential backoff
(0.2 s doubling) and resumes with the version it holds. Every one of those decisions is the
daemon's own: each light agent drives an `agent/session.AgentSession`, as the daemon does.
It records, per applied version, the wall-clock time it was verified and applied and the
time its ack was answered, so benchmarks measure from the agents' side.

One process runs many agents on one asyncio loop with one aiohttp `ClientSession` (one
connection per stream, acks on pooled connections). `LightAgents` spreads them over worker
processes (`python -m raftmesh.lab.light_agents`, a socketpair each), so the agents'
verification and JSON work is not limited to one Python thread, and drives them with commands
over the sockets. Agent i uses replica URL i mod R as its home. All times are `time.time()`
of this machine, so they compare across worker processes and with the benchmark driver.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import secrets
import socket
import subprocess
import sys
import time
import traceback
from multiprocessing.connection import Connection
from urllib.parse import urlsplit

from nacl.signing import SigningKey

from raftmesh.agent.acks import PendingAcks
from raftmesh.agent.session import APPLY_ARM_ACK, END, IGNORE, REVOKED, STOPPED_STATES, AgentSession
from raftmesh.proto.ack_datagram import CONFIRM_WAIT, AckDatagramError, decode_confirm, encode_ack
from raftmesh.proto.routes import (ACK, DEFAULT_KEEPALIVE, HEADER_ACK_PORT, HEADER_KEEPALIVE,
                                   HEADER_REPLICA, MAP, REGISTER, udp_port)
from raftmesh.proto.version import version_header


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _error_of(raw: bytes) -> tuple[str, str]:
    """(code, message) of an API error body ("" when it is not one)."""
    try:
        err = json.loads(raw)["error"]
        return str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        return "", raw[:200].decode(errors="replace")


KEEP_RECORDS = 4096  # per agent: applied versions kept (a benchmark reads them back)


# ======================================================================================
# inside a worker process
# ======================================================================================
class _Confirms(asyncio.DatagramProtocol):
    """A worker's UDP socket: resolves the future awaiting each confirmed ack datagram."""

    def __init__(self, waiting: dict[tuple[str, int], asyncio.Future]):
        self.waiting = waiting

    def datagram_received(self, data: bytes, addr) -> None:
        fut = self.waiting.get(decode_confirm(data))
        if fut is not None and not fut.done():
            fut.set_result(None)


class LightAgent:
    __slots__ = ("index", "hostname", "key", "machine", "node_key", "node_id", "ipv4", "home",
                 "url", "session", "applied", "acked", "connected_at", "replica", "bye", "task",
                 "lost_at", "reconnects", "errors", "stop", "first_netmap_at", "gone",
                 "stale", "max_acked", "stream", "cut", "ack_addr")

    def __init__(self, index: int, hostname: str, home: int):
        self.index, self.hostname, self.home, self.url = index, hostname, home, home
        self.key = SigningKey.generate()
        self.node_key = base64.b64encode(secrets.token_bytes(32)).decode()
        self.node_id: str | None = None
        self.ipv4: str | None = None
        self.session: AgentSession | None = None  # its decisions, from registration on
        self.applied: list[tuple[int, float]] = []  # (version, time applied)
        self.acked: dict[int, float] = {}  # version -> time the ack was answered
        self.max_acked = -1  # the highest version in `acked` (what waits poll)
        self.connected_at: float | None = None
        self.first_netmap_at: float | None = None
        self.replica: str | None = None  # the replica its current stream named (HEADER_REPLICA)
        self.bye: dict | None = None
        self.task: asyncio.Task | None = None
        self.lost_at: float | None = None
        self.reconnects: list[dict] = []  # {lost, connected, replica, attempts}
        self.errors = 0
        self.stop = False
        self.stream = None  # the response of the open map stream
        self.ack_addr: tuple[str, int] | None = None  # where its stream takes ack datagrams
        self.cut: str | None = None  # why the stream was closed from outside: "kick", "silent"
        self.gone: dict[str, tuple[int, float]] = {}  # watched peer -> (version, time) it left
        self.stale: list[tuple[int, int]] = []  # (frame version, held version): must stay empty

    @property
    def view(self):
        """Its AgentNetmap once registered."""
        return self.session.view if self.session is not None else None

    def peers(self) -> dict:
        return self.view.netmap.peers if self.view is not None and self.view.netmap else {}

    def first_applied(self, version: int) -> float | None:
        for v, t in self.applied:
            if v >= version:
                return t
        return None


class Swarm:
    """The agents of one worker process and their streams, on one event loop."""

    def __init__(self, urls: list[str], backoff_base: float = 0.2, source: str | None = None):
        import aiohttp
        self.aiohttp = aiohttp
        self.urls = [u.rstrip("/") for u in urls]
        self.backoff_base = backoff_base
        self.rng = random.Random()  # backoff and ack jitter of every agent here
        self.agents: list[LightAgent] = []
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60,
                                           local_addr=(source, 0) if source else None),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        self.ack_failures = 0
        self.ack_datagrams = 0  # acks confirmed as datagrams (the rest went over HTTP)
        self.frame_errors: list[str] = []
        self.watch: set[str] = set()  # peers whose removal agents record (revoke)
        self._watchdog_task: asyncio.Task | None = None
        self._udp: asyncio.DatagramTransport | None = None  # ack datagrams, made on first use
        self._confirms: dict[tuple[str, int], asyncio.Future] = {}  # (stream, version) awaited

    # -- signed requests ---------------------------------------------------------------------
    def _headers(self, agent: LightAgent, method: str, path: str, body: bytes,
                 stream_auth: tuple[str, bytes] | None = None) -> dict:
        from raftmesh.proto.machine_auth import sign_headers, tag_headers
        if stream_auth is None:
            h = sign_headers(agent.key, method, path, body, time.time(), secrets.token_hex(12))
        else:  # an ack to the stream's replica, tagged under its key (as the daemon does)
            h = tag_headers(stream_auth[1], stream_auth[0], _b64(bytes(agent.key.verify_key)),
                            method, path, body, time.time(), secrets.token_hex(12))
        h.update(version_header())
        if body:
            h["Content-Type"] = "application/json"
        return h

    async def _post(self, agent: LightAgent, url: str, path: str, body: dict,
                    timeout: float = 30.0,
                    stream_auth: tuple[str, bytes] | None = None) -> tuple[int, dict | str]:
        data = json.dumps(body).encode()
        headers = self._headers(agent, "POST", path, data, stream_auth)  # just before sending
        async with self.http.post(url + path, data=data, headers=headers,
                                  timeout=self.aiohttp.ClientTimeout(total=timeout)) as resp:
            raw = await resp.read()
            try:
                return resp.status, json.loads(raw)
            except ValueError:
                return resp.status, raw.decode(errors="replace")

    # -- registration --------------------------------------------------------------------------
    async def register(self, count: int, auth_key: str, prefix: str, concurrency: int,
                       base: int, deadline_s: float = 3600.0) -> list[dict]:
        new = [LightAgent(base + i, f"{prefix}{base + i}", (base + i) % len(self.urls))
               for i in range(count)]
        self.agents.extend(new)
        sem = asyncio.Semaphore(concurrency)
        end = time.monotonic() + deadline_s

        async def one(a: LightAgent) -> None:
            body = {"node_key": a.node_key, "hostname": a.hostname, "auth_key": auth_key}
            a.session = session = AgentSession(self.rng, backoff_base=self.backoff_base)
            target = a.home
            async with sem:
                while True:
                    try:
                        status, resp = await self._post(a, self.urls[target], REGISTER, body)
                        if status == 200:
                            break
                        if status < 500:
                            raise RuntimeError(f"register {a.hostname}: {status} {resp}")
                        error = f"{status}"
                    except (self.aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                        error = repr(e)
                    if time.monotonic() > end:
                        raise TimeoutError(f"register {a.hostname}: no replica accepted it")
                    nxt = session.unreachable(error)
                    target = (target + 1) % len(self.urls)
                    await asyncio.sleep(nxt.wait)
            a.node_id, a.ipv4 = resp["node"]["id"], resp["node"]["ipv4"]
            session.registered(resp)

        await asyncio.gather(*(one(a) for a in new))
        return [{"index": a.index, "node_id": a.node_id, "hostname": a.hostname, "ipv4": a.ipv4,
                 "node_key": a.node_key, "machine_key": _b64(bytes(a.key.verify_key))} for a in new]

    # -- streams ----------------------------------------------------------------------------
    async def connect(self, concurrency: int, timeout: float, home: int | None = None,
                      count: int | None = None) -> dict:
        """Start the streams of agents not streaming yet (at most `count`; all from replica
        `home`, if given) and wait until each started one holds a netmap."""
        sem = asyncio.Semaphore(concurrency)
        for a in self.agents:
            if a.task is None and a.node_id is not None:
                if count is not None:
                    if count <= 0:
                        break
                    count -= 1
                if home is not None:
                    a.home = a.url = home
                a.task = asyncio.get_running_loop().create_task(self._stream_loop(a, sem))
        if self._watchdog_task is None:
            self._watchdog_task = asyncio.get_running_loop().create_task(self._watchdog())
        ok = await self._wait(lambda a: a.task is None or a.bye is not None or (
            a.view.netmap is not None and a.connected_at is not None), timeout)
        return {"connected": ok, "agents": len(self.agents)}

    async def _stream_loop(self, a: LightAgent, sem: asyncio.Semaphore | None) -> None:
        from raftmesh.proto.frames import FrameError, FrameReader, stream_keypair
        from raftmesh.proto.machine_auth import HEADER_NONCE
        from raftmesh.proto.wire import HEADER_STREAM_KEY
        session = a.session
        attempts = 0
        while not a.stop:
            url = self.urls[a.url]
            since = session.since
            query = "" if since is None else f"?since={since}"
            opened, nxt, reason = False, None, None
            try:
                if sem is not None:
                    await sem.acquire()
                try:
                    headers = self._headers(a, "GET", MAP, b"")
                    stream_keys = stream_keypair()
                    headers[HEADER_STREAM_KEY] = stream_keys[0].hex()
                    resp = await self.http.get(url + MAP + query, headers=headers)
                finally:
                    if sem is not None:
                        sem.release()
                        sem = None  # only the first connection is throttled
                async with resp:
                    if resp.status != 200:
                        code, message = _error_of(await resp.read())
                        nxt = session.refused(resp.status, code, message)
                        if session.state in STOPPED_STATES:
                            a.bye = {"code": code, "status": resp.status}
                            return
                        raise ConnectionError(f"{resp.status} {code}")
                    a.replica = resp.headers.get(HEADER_REPLICA)
                    ack_port = udp_port(resp.headers.get(HEADER_ACK_PORT))
                    a.ack_addr = None if ack_port is None else (urlsplit(url).hostname, ack_port)
                    a.connected_at = time.time()
                    if a.lost_at is not None:
                        a.reconnects.append({"lost": a.lost_at, "connected": a.connected_at,
                                             "replica": a.replica, "attempts": attempts})
                        a.lost_at = None
                    attempts = 0
                    try:
                        keepalive = float(resp.headers.get(HEADER_KEEPALIVE, DEFAULT_KEEPALIVE))
                    except ValueError:
                        keepalive = DEFAULT_KEEPALIVE
                    reader = FrameReader()
                    session.stream_opened(headers[HEADER_NONCE], stream_keys, keepalive, time.monotonic())
                    opened, a.stream, a.cut = True, resp, None
                    try:
                        while True:
                            data = await resp.content.readany()
                            if not data:
                                if a.cut == "silent":
                                    raise ConnectionError(session.end_reason)
                                break  # EOF
                            now = time.monotonic()
                            for frame in reader.feed(data):
                                action = self._apply(a, url, frame, now)
                                if action is REVOKED:  # the daemon stops streaming too
                                    a.connected_at = None
                                    return
                                if action is END:
                                    raise ConnectionError(session.end_reason)
                    finally:
                        a.stream = None
            except FrameError as e:
                a.errors += 1
                reason = f"bad frame: {e}"
                self.frame_errors.append(f"{a.hostname}: {e}")
            except (self.aiohttp.ClientError, asyncio.TimeoutError, OSError, ConnectionError) as e:
                reason = repr(e)
                if a.cut != "kick":
                    a.errors += 1
            if a.stop:
                return
            kicked, a.cut = a.cut == "kick", None
            a.connected_at = None
            if opened:
                nxt = session.stream_ended(reason, moved=kicked)
            elif nxt is None:
                nxt = session.unreachable(reason or "no stream")
            if kicked:  # rehome: straight to a.url, which the caller set
                continue
            if a.lost_at is None:
                a.lost_at = time.time()
            attempts += 1
            if nxt.rotate:
                a.url = (a.url + 1) % len(self.urls)
            await asyncio.sleep(nxt.wait)

    async def _watchdog(self) -> None:
        """Close streams that were silent for twice their keepalive (the daemon's watchdog).
        One sweep per second for all agents instead of a timer per read: at thousands of
        agents per process, per-read timers and futures cost more than the frames."""
        while True:
            await asyncio.sleep(1.0)  # a periodic sweep, not synchronisation
            now = time.monotonic()
            for a in self.agents:
                if a.stream is not None and a.session.silent(now):
                    self._cut(a, "silent")

    @staticmethod
    def _cut(a: LightAgent, why: str) -> None:
        a.cut = why
        a.stream.close()  # its readany() ends with an error: the loop moves on

    def _apply(self, a: LightAgent, url: str, frame, now: float) -> str:
        """One frame through the agent's session; its action, after recording what the
        benchmarks read back."""
        had = [p for p in self.watch if p in a.peers()] if self.watch else ()
        session = a.session
        held = session.view.version
        wall = time.time()
        action, verdict = session.frame(frame, now, wall)
        if action is IGNORE:
            if verdict.kind == "stale":
                a.stale.append((verdict.version, held))
            return action
        if action is END:
            if verdict is None:  # failed verification
                self.frame_errors.append(f"{a.hostname}: {session.end_reason}")
            return action
        if action is REVOKED:
            a.bye = verdict.bye or {}
            return action
        if a.first_netmap_at is None:
            a.first_netmap_at = wall
        a.applied.append((verdict.version, wall))
        for p in had:
            if p not in verdict.netmap.peers:
                a.gone[p] = (verdict.version, wall)
        if len(a.applied) > KEEP_RECORDS:
            del a.applied[:len(a.applied) - KEEP_RECORDS]
        if action is APPLY_ARM_ACK:
            acks = session.acks
            asyncio.get_running_loop().create_task(self._ack_later(a, url, acks, acks.due_at - now))
        return action

    async def _ack_later(self, a: LightAgent, url: str, acks: PendingAcks, delay: float) -> None:
        await asyncio.sleep(delay)  # until the session's ack round is due, not synchronisation
        # (taken at once: a timer may fire a hair early; a cleared round means the stream
        # ended, and its replica cannot use the ack)
        body = acks.take(time.monotonic()) if a.session.acks is acks else None
        if body is None:
            return
        stream_auth, ack_addr = a.view.stream_auth, a.ack_addr
        if ack_addr is not None and stream_auth is not None and \
                await self._ack_datagram(ack_addr, stream_auth, body):
            self.ack_datagrams += 1
            self._acked(a, body["version"])
            return
        try:  # as the daemon does (agent/ack_sender.py): over HTTP if no datagram was confirmed
            status, _ = await self._post(a, url, ACK, body, timeout=30, stream_auth=stream_auth)
            if status == 200:
                self._acked(a, body["version"])
                return
        except (self.aiohttp.ClientError, asyncio.TimeoutError, OSError):
            pass
        self.ack_failures += 1

    @staticmethod
    def _acked(a: LightAgent, version: int) -> None:
        a.acked[version] = time.time()
        a.max_acked = max(a.max_acked, version)
        if len(a.acked) > KEEP_RECORDS:
            for v in sorted(a.acked)[:len(a.acked) - KEEP_RECORDS]:
                del a.acked[v]

    async def _ack_datagram(self, addr: tuple[str, int], stream_auth: tuple[str, bytes],
                            body: dict) -> bool:
        """The ack as one datagram (proto/ack_datagram.py) from this worker's UDP socket;
        True once the replica confirmed it within CONFIRM_WAIT."""
        try:
            data = encode_ack(stream_auth, body)
        except AckDatagramError:
            return False
        loop = asyncio.get_running_loop()
        if self._udp is None:
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: _Confirms(self._confirms), family=socket.AF_INET)
            self._udp.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        key = (stream_auth[0], body["version"])
        fut = self._confirms[key] = loop.create_future()
        try:
            self._udp.sendto(data, addr)
            await asyncio.wait_for(fut, CONFIRM_WAIT)
            return True
        except (asyncio.TimeoutError, OSError):
            return False
        finally:
            self._confirms.pop(key, None)

    async def _wait(self, pred, timeout: float, interval: float = 0.2) -> bool:
        """Poll `pred` over the agents until all hold (True) or the deadline (False). The
        times benchmarks report are recorded by the agents, not by this poll, which shares
        the agents' CPU: keep `pred` to an attribute test (it was 10-15% of a worker's CPU
        at 10,000 agents when it scanned every agent's acks every 20 ms)."""
        end = time.monotonic() + timeout
        pending = list(self.agents)
        while True:
            pending = [a for a in pending if not pred(a)]
            if not pending:
                return True
            if time.monotonic() > end:
                return False
            await asyncio.sleep(interval)

    # -- commands --------------------------------------------------------------------------
    async def wait_version(self, version: int, timeout: float, exclude: tuple = (),
                           prefix: str = "") -> list[dict]:
        """Until every agent whose hostname starts with `prefix` (and not in `exclude`)
        applied `version` and its ack was answered."""
        live = lambda a: (a.node_id not in exclude and a.bye is None  # noqa: E731
                          and a.hostname.startswith(prefix))
        await self._wait(lambda a: a.max_acked >= version or not live(a), timeout)
        out = []
        for a in self.agents:
            if not live(a):
                continue
            out.append({"node_id": a.node_id, "replica": a.replica, "home": a.home,
                        "applied": a.first_applied(version), "acked": self._acked_at(a, version)})
        return out

    async def wait_applied(self, version: int, timeout: float, prefix: str = "") -> bool:
        """Until every live agent whose hostname starts with `prefix` applied `version`
        (a benchmark reads the CPU spent on delivery alone at that moment)."""
        return await self._wait(lambda a: a.bye is not None or not a.hostname.startswith(prefix)
                                or (a.view.version or 0) >= version, timeout)

    @staticmethod
    def _acked_at(a: LightAgent, version: int) -> float | None:
        ts = [t for v, t in a.acked.items() if v >= version]
        return min(ts) if ts else None

    def note_peer(self, peer_id: str) -> int:
        """Start recording when `peer_id` leaves each agent's netmap; returns how many have it."""
        self.watch.add(peer_id)
        return sum(peer_id in a.peers() for a in self.agents)

    async def wait_gone(self, peer_id: str, timeout: float) -> list[dict]:
        """Until `peer_id` (noted before its revocation) is in no agent's netmap and the
        version that removed it is acked, for every agent that had it."""
        targets = [a for a in self.agents if a.node_id != peer_id and a.bye is None
                   and (peer_id in a.peers() or peer_id in a.gone)]

        def done(a: LightAgent) -> bool:
            g = a.gone.get(peer_id)
            return g is not None and a.max_acked >= g[0]
        among = set(targets)
        await self._wait(lambda a: a not in among or done(a), timeout)
        self.watch.discard(peer_id)
        out = []
        for a in targets:
            version, applied = a.gone.get(peer_id, (None, None))
            out.append({"node_id": a.node_id, "replica": a.replica, "removed_version": version,
                        "applied": applied,
                        "acked": self._acked_at(a, version) if version is not None else None})
        return out

    def status(self) -> dict:
        by_replica: dict[str, int] = {}
        for a in self.agents:
            if a.connected_at is not None:
                by_replica[a.replica or "?"] = by_replica.get(a.replica or "?", 0) + 1
        versions = [a.view.version for a in self.agents if a.view is not None and a.view.version]
        return {"agents": len(self.agents), "connected": sum(by_replica.values()),
                "started": sum(a.task is not None for a in self.agents),
                "by_replica": by_replica, "min_version": min(versions, default=None),
                "max_version": max(versions, default=None), "ack_failures": self.ack_failures,
                "ack_datagrams": self.ack_datagrams,
                "stream_errors": sum(a.errors for a in self.agents),
                "frame_errors": self.frame_errors[:5], "byes": sum(a.bye is not None for a in self.agents),
                "peers_total": sum(len(a.peers()) for a in self.agents)}

    def reconnects(self, since: float) -> list[dict]:
        out = []
        for a in self.agents:
            for r in a.reconnects:
                if r["lost"] >= since:
                    out.append({"node_id": a.node_id, **r})
        return out

    def netmaps(self) -> list[dict]:
        """Each agent's netmap and the versions it applied, for the chaos checks."""
        return [{"node_id": a.node_id, "replica": a.replica,
                 "netmap": a.view.netmap.to_json() if a.view is not None and a.view.netmap else None,
                 "applied": [v for v, _ in a.applied], "stale_frames": len(a.stale),
                 "first_stale": a.stale[0] if a.stale else None, "bye": a.bye,
                 "connected": a.connected_at is not None, "errors": a.errors,
                 "reconnects": len(a.reconnects)} for a in self.agents]

    def where(self) -> list[dict]:
        return [{"node_id": a.node_id, "replica": a.replica, "version": a.view.version if a.view else None,
                 "connected": a.connected_at is not None} for a in self.agents]

    async def rehome(self, timeout: float) -> bool:
        """Drop every stream not on its home replica and reconnect home (with its version)."""
        for a in self.agents:
            if a.task is not None and a.url != a.home and a.bye is None:
                a.url = a.home
                if a.stream is not None:
                    self._cut(a, "kick")
                    a.connected_at = None  # until the stream from home is open
        return await self._wait(lambda a: a.bye is not None or (
            a.connected_at is not None and a.url == a.home), timeout)

    async def close(self) -> None:
        if self._watchdog_task is not None:
            self._watchdog_task.cancel()
        for a in self.agents:
            a.stop = True
            if a.task is not None:
                a.task.cancel()
        await asyncio.gather(*(a.task for a in self.agents if a.task is not None),
                             return_exceptions=True)
        await self.http.close()
        if self._udp is not None:
            self._udp.close()


def _worker_main(conn, urls: list[str], source: str | None = None) -> None:
    """A worker process: a Swarm driven by (command, kwargs) messages on `conn`."""
    import gc
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Each frame leaves a few dozen short-lived tracked objects; with the default threshold
    # of 700 the young generations were collected every ~20 frames (with the full passes
    # they trigger, ~20% of a worker's CPU at 10,000 agents). What we measure is the
    # control plane, not this process's collector.
    gc.set_threshold(20_000, *gc.get_threshold()[1:])

    async def main() -> None:
        loop = asyncio.get_running_loop()
        swarm = Swarm(urls, source=source)
        try:
            while True:
                try:
                    cmd, kw = await loop.run_in_executor(None, conn.recv)
                except (EOFError, OSError):
                    break  # the driver is gone
                if cmd == "close":
                    break
                try:
                    fn = getattr(swarm, cmd)
                    out = fn(**kw)
                    if asyncio.iscoroutine(out):
                        out = await out
                    if cmd in ("register", "connect"):
                        gc.collect()
                        gc.freeze()  # thousands of long-lived agents: keep full GCs short
                    conn.send(("ok", out))
                except Exception:
                    conn.send(("error", traceback.format_exc()))
        finally:
            await swarm.close()
            try:
                conn.send(("ok", None))
            except OSError:
                pass

    import uvloop  # the replicas' loop: cheaper harness CPU, which the replicas share here
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


if __name__ == "__main__":  # a worker: python -m raftmesh.lab.light_agents FD URLS_JSON [SOURCE_IP]
    _worker_main(Connection(int(sys.argv[1])), json.loads(sys.argv[2]), *sys.argv[3:4])


# ======================================================================================
# the driver side
# ======================================================================================
class LightAgents:
    """Light agents in `workers` processes; every call fans out to all workers and waits.

    Use as a context manager: `close()` ends every worker process (by its pid). `source`:
    the local address every connection binds (the geo lab tells regions apart by it)."""

    def __init__(self, urls: list[str], workers: int = 1, log_dir: str | None = None,
                 source: str | None = None):
        self.urls = list(urls)
        self.workers: list[tuple] = []
        self.pids: list[int] = []
        self.nodes: list[dict] = []
        try:
            for i in range(max(1, workers)):
                parent, child = socket.socketpair()
                log = open(os.path.join(log_dir, f"light-agents-{i}.log"), "ab") if log_dir else None
                p = subprocess.Popen([sys.executable, "-m", "raftmesh.lab.light_agents",
                                      str(child.fileno()), json.dumps(self.urls),
                                      *([source] if source else [])],
                                     pass_fds=[child.fileno()], stdin=subprocess.DEVNULL,
                                     stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)
                if log:
                    log.close()
                child.close()
                self.workers.append((p, Connection(parent.detach())))
                self.pids.append(p.pid)
        except BaseException:
            self.close()
            raise

    @property
    def n(self) -> int:
        return len(self.nodes)

    def _call(self, cmd: str, per_worker: list[dict] | None = None, **kw) -> list:
        for i, (_, conn) in enumerate(self.workers):
            conn.send((cmd, per_worker[i] if per_worker else kw))
        out, failed = [], None
        for p, conn in self.workers:
            try:
                status, value = conn.recv()
            except (EOFError, OSError) as e:
                status, value = "error", f"worker exited ({p.poll()}): {e!r}"
            if status != "ok":
                failed = failed or f"light-agent worker {p.pid} failed in {cmd}:\n{value}"
            out.append(value)
        if failed:
            raise RuntimeError(failed)
        return out

    def register(self, n: int, auth_key: str, prefix: str = "la", concurrency: int = 64) -> list[dict]:
        """Register `n` more agents, spread evenly over the workers, with one reusable
        pre-auth key; at most `concurrency` registrations in flight in total."""
        w = len(self.workers)
        counts = [n // w + (1 if i < n % w else 0) for i in range(w)]
        bases, b = [], self.n
        for c in counts:
            bases.append(b)
            b += c
        share = max(1, concurrency // w)
        got = self._call("register", [{"count": c, "auth_key": auth_key, "prefix": prefix,
                                       "concurrency": share, "base": base}
                                      for c, base in zip(counts, bases)])
        new = [x for part in got for x in part]
        self.nodes.extend(new)
        return new

    def connect(self, timeout: float = 300.0, concurrency: int = 256, home: int | None = None,
                count: int | None = None) -> bool:
        """Open the streams of agents not streaming yet (at most `count`, spread over the
        workers; all from replica index `home`, if given); True when all hold a netmap."""
        w = len(self.workers)
        share = max(1, concurrency // w)
        per = [None] * w if count is None else [count // w + (1 if i < count % w else 0) for i in range(w)]
        return all(r["connected"] for r in self._call("connect", [
            {"concurrency": share, "timeout": timeout, "home": home, "count": c} for c in per]))

    def wait_version(self, version: int, timeout: float, exclude=(), prefix: str = "") -> list[dict]:
        return [x for part in self._call("wait_version", version=version, timeout=timeout,
                                         exclude=tuple(exclude), prefix=prefix) for x in part]

    def wait_applied(self, version: int, timeout: float, prefix: str = "") -> bool:
        return all(self._call("wait_applied", version=version, timeout=timeout, prefix=prefix))

    def settle(self, quiet: float = 1.5, timeout: float = 120.0) -> bool:
        """Poll until every started agent streams and no agent's version moved for `quiet`
        seconds (the presence writes after a connect storm are through)."""
        end = time.monotonic() + timeout
        last, since = None, time.monotonic()
        while time.monotonic() < end:
            st = self.status()
            key = (st["connected"], st["max_version"], st["min_version"])
            if key != last:
                last, since = key, time.monotonic()
            elif st["connected"] == st["started"] - st["byes"] and time.monotonic() - since >= quiet:
                return True
            time.sleep(0.25)
        return False

    def note_peer(self, peer_id: str) -> int:
        return sum(self._call("note_peer", peer_id=peer_id))

    def wait_gone(self, peer_id: str, timeout: float) -> list[dict]:
        return [x for part in self._call("wait_gone", peer_id=peer_id, timeout=timeout) for x in part]

    def status(self) -> dict:
        parts = self._call("status")
        out = {"agents": 0, "connected": 0, "started": 0, "by_replica": {}, "ack_failures": 0,
               "ack_datagrams": 0, "stream_errors": 0, "frame_errors": [], "byes": 0, "peers_total": 0,
               "min_version": None, "max_version": None}
        for p in parts:
            for k in ("agents", "connected", "started", "ack_failures", "ack_datagrams",
                      "stream_errors", "byes", "peers_total"):
                out[k] += p[k]
            for r, c in p["by_replica"].items():
                out["by_replica"][r] = out["by_replica"].get(r, 0) + c
            out["frame_errors"] += p["frame_errors"]
            if p["min_version"] is not None:
                out["min_version"] = min(p["min_version"], out["min_version"] or p["min_version"])
                out["max_version"] = max(p["max_version"], out["max_version"] or 0)
        return out

    def where(self) -> list[dict]:
        return [x for part in self._call("where") for x in part]

    def netmaps(self) -> list[dict]:
        return [x for part in self._call("netmaps") for x in part]

    def reconnects(self, since: float) -> list[dict]:
        return [x for part in self._call("reconnects", since=since) for x in part]

    def rehome(self, timeout: float = 60.0) -> bool:
        return all(self._call("rehome", timeout=timeout))

    def close(self) -> None:
        for p, conn in self.workers:
            try:
                conn.send(("close", {}))
            except (OSError, ValueError):
                pass
        for p, conn in self.workers:
            try:
                if conn.poll(20):
                    conn.recv()
            except (OSError, EOFError):
                pass
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()  # SIGKILL through Popen: this worker's pid only
                p.wait(5)
            conn.close()
        self.workers.clear()

    def __enter__(self) -> "LightAgents":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def default_workers(n: int) -> int:
    """One worker per ~400 agents, at most CPUs + 1: at 1,000 agents a single worker was
    ~90% busy (frame verification, and signing and sending acks) and set the tail latency."""
    return max(1, min((os.cpu_count() or 1) + 1, -(-n // 400)))

