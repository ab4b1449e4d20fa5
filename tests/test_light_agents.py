"""The benchmarks' light agents fail over like the daemon: a stream that goes silent for twice
its keepalive is dropped by the per-process watchdog sweep, and a rehome moves a stream home
without counting an error. Loopback aiohttp servers stand in for replicas that hang."""
import asyncio
import time

from aiohttp import web

from raftmesh.agent.netmap_state import AgentNetmap
from raftmesh.chaos.light_agents import LightAgent, Swarm


async def _silent_replicas(n: int):
    """n servers answering /machine/map with a stream head and then nothing; returns
    (runners, urls, requests seen per server)."""
    seen = [0] * n
    runners, urls = [], []
    done = asyncio.Event()
    for i in range(n):
        async def hang(request, i=i):
            seen[i] += 1
            resp = web.StreamResponse(headers={"X-Raftmesh-Keepalive": "0.5",
                                               "X-Raftmesh-Replica": f"r{i}"})
            await resp.prepare(request)
            await done.wait()  # a replica that stopped sending (until the test ends)
            return resp
        app = web.Application()
        app.router.add_get("/machine/map", hang)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
    return runners, urls, seen, done


async def _until(pred, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.02)


def test_silent_stream_is_dropped_and_the_agent_moves_on():
    async def main():
        runners, urls, seen, done = await _silent_replicas(2)
        swarm = Swarm(urls, backoff_base=0.01)
        try:
            a = LightAgent(0, "la0", 0)
            a.node_id, a.view = "n1", AgentNetmap("n1", {})
            swarm.agents.append(a)
            await swarm.connect(concurrency=1, timeout=0.1)  # no netmap ever comes: False
            await _until(lambda: seen[1] >= 1, 10)  # 2 x 0.5 s of silence, then the next URL
            assert seen[0] == 1 and a.errors >= 1 and a.url == 1
        finally:
            done.set()
            await swarm.close()
            for r in runners:
                await r.cleanup()
    asyncio.run(main())


def test_rehome_moves_a_stream_without_an_error():
    async def main():
        runners, urls, seen, done = await _silent_replicas(2)
        swarm = Swarm(urls, backoff_base=0.01)
        try:
            a = LightAgent(0, "la0", 1)
            a.node_id, a.view = "n1", AgentNetmap("n1", {})
            a.url = 0  # streaming away from home
            swarm.agents.append(a)
            await swarm.connect(concurrency=1, timeout=0.1)
            await _until(lambda: a.stream is not None, 5)
            assert await swarm.rehome(timeout=5)
            assert seen == [1, 1] and a.errors == 0 and a.replica == "r1"
        finally:
            done.set()
            await swarm.close()
            for r in runners:
                await r.cleanup()
    asyncio.run(main())
