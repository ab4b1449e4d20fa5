"""A stored policy a replica cannot interpret (a newer compiled format, during a rolling
upgrade) never becomes deny-all there: the replica keeps the netmaps it derived last, says
why on /readyz and in a metric, and after a restart serves nothing (closing the streams it
had, so agents move on) until a readable policy arrives. In process: one replica, its app
(hub, /readyz, /metrics) on a test server."""
import asyncio

from raftmesh.cluster.policy import parse_policy
from raftmesh.cluster.policy_form import compile_policy

from test_policy_api import served
from test_stream_open_order import ALLOW_ALL, apply, leading_replica

NEWER = {"text": "{}", "compiled": {**compile_policy(parse_policy(ALLOW_ALL)), "format": 99}}


async def eventually(check, timeout: float = 10.0):
    """Await `check()` until it returns a truthy value or the deadline passes."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := await check()):
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)
    return value


def test_unreadable_policy_keeps_netmaps_and_makes_the_replica_not_ready(tmp_path):
    r = leading_replica(tmp_path)
    try:
        apply(r, "user.create", {"name": "alice"})
        apply(r, "policy.set", {"text": ALLOW_ALL})  # an entry from before the compiled form
        for n in ("a", "b"):
            apply(r, "node.register", {"id": n, "name": n, "user": "alice", "machine_key": "m" + n,
                                       "node_key": "k" + n})
            apply(r, "node.approve", {"id": n})

        async def scenario():
            async with served(r) as (client, hub):
                async def ready():
                    resp = await client.get("/readyz")
                    return resp.status, (await resp.json())["reason"]

                async def is_ready():
                    return await ready() == (200, "ready")

                async def unserved():
                    return hub.unserved_reason()

                await eventually(is_ready)
                assert "b" in (await hub.on_feed(lambda f: f.full("a"))).peers

                unreadable = apply(r, "policy.set", NEWER)
                assert await hub.wait_version(unreadable["version"], 10)
                status, reason = await ready()
                assert status == 503
                assert "policy version 2" in reason and "format 99" in reason, reason
                metrics = await (await client.get("/metrics")).text()
                assert "raftmesh_policy_unreadable 1.0" in metrics
                assert "b" in (await hub.on_feed(lambda f: f.full("a"))).peers, "not deny-all"

                stream, _ = await hub.open_stream("a", "127.0.0.1", None, "nonce-1")
                hub._on_reset()  # as after a restart or snapshot install: built from the store
                assert "format 99" in await eventually(unserved)
                assert stream.closing["code"] == "not_ready", "no deny-all full netmap sent"

                readable = apply(r, "policy.set", {"text": ALLOW_ALL,
                                                   "compiled": compile_policy(parse_policy(ALLOW_ALL))})
                assert await hub.wait_version(readable["version"], 10)
                assert await ready() == (200, "ready") and hub.unserved_reason() is None
                assert "b" in (await hub.on_feed(lambda f: f.full("a"))).peers
        asyncio.run(scenario())
    finally:
        r.stop()

