"""The benchmarks' light agents fail over like the daemon: a stream that goes silent for twice
its keepalive is dropped by the per-process watchdog sweep, and a rehome moves a stream home
without counting an error. Loopback aiohttp servers stand in for replicas that hang."""
import asyncio
import contextlib
import random
import time

from aiohttp import web

from raftmesh.agent.netmap_state import AgentNetmap
from raftmesh.agent.session import AgentSession
from raftmesh.lab.light_agents import LightAgent, Swarm
from raftmesh.proto.routes import HEADER_KEEPALIVE, HEADER_REPLICA, MAP


@contextlib.asynccontextmanager
async def silent_replicas(n: int, home: int, start_at: int):
    """n servers answering /machine/map with a stream head and then nothing, and a swarm of
    one agent (home `home`, first connecting to `start_at`); yields (swarm, agent, requests
    seen per server) and ends the servers and the swarm."""
    seen, runners, urls, done = [0] * n, [], [], asyncio.Event()
    for i in range(n):
        async def hang(request, i=i):
            seen[i] += 1
            resp = web.StreamResponse(headers={HEADER_KEEPALIVE: "0.5", HEADER_REPLICA: f"r{i}"})
            await resp.prepare(request)
            await done.wait()  # a replica that stopped sending (until the test ends)
            return resp
        app = web.Application()
        app.router.add_get(MAP, hang)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
    swarm = Swarm(urls, backoff_base=0.01)
    a = LightAgent(0, "la0", home)
    a.node_id, a.url = "n1", start_at
    a.session = AgentSession(random.Random(), AgentNetmap("n1", {}), backoff_base=0.01)
    swarm.agents.append(a)
    try:
        await swarm.connect(concurrency=1, timeout=0.1)  # no netmap ever comes: returns False
        yield swarm, a, seen
    finally:
        done.set()
        await swarm.close()
        for r in runners:
            await r.cleanup()


async def _until(pred, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.02)


def test_silent_stream_is_dropped_and_the_agent_moves_on():
    async def main():
        async with silent_replicas(2, home=0, start_at=0) as (swarm, a, seen):
            await _until(lambda: seen[1] >= 1, 10)  # 2 x 0.5 s of silence, then the next URL
            assert seen[0] == 1 and a.errors >= 1 and a.url == 1
    asyncio.run(main())


def test_rehome_moves_a_stream_without_an_error():
    async def main():
        async with silent_replicas(2, home=1, start_at=0) as (swarm, a, seen):
            await _until(lambda: a.stream is not None, 5)
            assert await swarm.rehome(timeout=5)
            assert seen == [1, 1] and a.errors == 0 and a.replica == "r1"
    asyncio.run(main())
