"""User-space latency for replica links (Raft; the geo lab also API): this kernel has no `tc netem`.

One proxy runs inside each replica's namespace. nftables redirects peers' connections to
the replica's Raft port into it (lab/replica_net.py), and it relays them to the real port,
holding every chunk until `now + delay (+/- jitter)` per direction. Release times never go
backwards, so TCP's byte order is kept. pysyncobj opens one connection per pair of
replicas, so every pair's traffic crosses exactly one proxy, and a delay set per peer
address gives every pair its own round trip (the geo lab, lab/geo_net.py). One process may
relay several ports (repeat --listen/--target in pairs; the geo lab adds the API port, its
clients told apart by their source address); they share one delay table.

The delay is changed at run time over a line protocol on a control port:
  `set <peer-ip|*> <delay-ms> <jitter-ms>` -> `ok`,  `clear` -> `ok`,  `ping` -> `ok`
and applies to chunks read after the change, on existing connections too.

    python -m raftmesh.lab.latency_proxy --listen IP:PORT --target IP:PORT [--listen .. --target ..] --control IP:PORT
"""
from __future__ import annotations

import argparse
import asyncio
import random
import signal
import socket


class Delays:
    def __init__(self):
        self.by_peer: dict[str, tuple[float, float]] = {}

    def get(self, peer: str) -> tuple[float, float]:
        return self.by_peer.get(peer) or self.by_peer.get("*") or (0.0, 0.0)

    def command(self, line: str) -> str:
        parts = line.split()
        if parts == ["ping"]:
            return "ok"
        if parts == ["clear"]:
            self.by_peer.clear()
            return "ok"
        if len(parts) == 4 and parts[0] == "set":
            try:
                delay, jitter = float(parts[2]) / 1000, float(parts[3]) / 1000
            except ValueError:
                return "error: delay and jitter must be numbers (ms)"
            self.by_peer[parts[1]] = (delay, jitter)
            return "ok"
        return "error: expected 'set <ip|*> <delay-ms> <jitter-ms>', 'clear' or 'ping'"


async def _pump(reader, writer, delay_of, rng: random.Random) -> None:
    """Copy reader -> writer, each chunk released after its delay, in order."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    async def release():
        while True:
            when, data = await queue.get()
            if data is None:
                return
            wait = when - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(release())
    last = 0.0
    try:
        while data := await reader.read(65536):
            delay, jitter = delay_of()
            when = loop.time() + max(0.0, delay + rng.uniform(-jitter, jitter)) if delay else loop.time()
            last = max(last, when)
            queue.put_nowait((last, data))
        queue.put_nowait((last, None))
        await sender
    finally:
        sender.cancel()


def _tune(writer) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


async def serve(relays: list[tuple[tuple[str, int], tuple[str, int]]],
                control: tuple[str, int]) -> None:
    """Relay each (listen, target) pair until SIGTERM/SIGINT."""
    delays, rng = Delays(), random.Random()

    async def relay(c_reader, c_writer, target):
        peer = c_writer.get_extra_info("peername")[0]
        try:
            u_reader, u_writer = await asyncio.wait_for(asyncio.open_connection(*target), 5)
        except (OSError, asyncio.TimeoutError):
            c_writer.close()  # the replica is down: the peer sees the connection drop
            return
        tasks = []
        try:  # one side closing or failing ends both: no half-open Raft connections
            for w in (c_writer, u_writer):
                _tune(w)  # EBADF when the peer has gone already (the upstream is closed below)
            tasks = [asyncio.create_task(_pump(c_reader, u_writer, lambda: delays.get(peer), rng)),
                     asyncio.create_task(_pump(u_reader, c_writer, lambda: delays.get(peer), rng))]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except OSError:
            pass
        finally:
            for t in tasks:
                t.cancel()
            for w in (c_writer, u_writer):
                w.close()

    async def controller(reader, writer):
        try:
            while line := await reader.readline():
                writer.write((delays.command(line.decode(errors="replace")) + "\n").encode())
                await writer.drain()
        finally:
            writer.close()

    servers = [await asyncio.start_server(lambda r, w, t=target: relay(r, w, t), *listen,
                                          reuse_address=True) for listen, target in relays]
    servers.append(await asyncio.start_server(controller, *control, reuse_address=True))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for server in servers:
            server.close()


def send(control: tuple[str, int], line: str, timeout: float = 2.0) -> str:
    """One control command from the chaos driver; returns the proxy's answer."""
    with socket.create_connection(control, timeout=timeout) as s:
        s.sendall(line.encode() + b"\n")
        f = s.makefile("r")
        return f.readline().strip()


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", type=_addr, action="append", required=True)
    p.add_argument("--target", type=_addr, action="append", required=True)
    p.add_argument("--control", type=_addr, required=True)
    a = p.parse_args()
    if len(a.listen) != len(a.target):
        p.error(f"--listen and --target come in pairs; got {len(a.listen)} and {len(a.target)}")
    asyncio.run(serve(list(zip(a.listen, a.target)), a.control))


if __name__ == "__main__":
    main()
