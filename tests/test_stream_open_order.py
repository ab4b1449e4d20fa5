"""A stream that opens while the netmap feed moves on gets every change after its first
frame: the regression a chaos run found (an agent that resumed while a node was deleted kept
that node as a peer). In process: one replica, the hub, and a change forced into the window
between computing the first frame and starting to stream (over the in-memory Raft: the
window is the hub's, not Raft's)."""
import asyncio
import json

from prometheus_client import CollectorRegistry

from raftmesh.api.map_stream import StreamHub
from raftmesh.cluster.commands import build
from raftmesh.cluster.config import ReplicaConfig
from raftmesh.cluster.raft import Outcome
from raftmesh.cluster.raft.in_memory import InMemoryRaft

ALLOW_ALL = json.dumps({"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]})


def apply(r, op, args):
    outcome = r.propose(build(op, args, time=100.0)).result(10)
    assert outcome.kind == Outcome.APPLIED and outcome.result["ok"], outcome.result
    return outcome.result


def leading_replica(tmp_path) -> InMemoryRaft:
    """A one-member cluster in this process, leading (the caller stops it)."""
    return InMemoryRaft(ReplicaConfig(id="r0", raft_addr="127.0.0.1:1", peers=[],
                                      data_dir=str(tmp_path / "r0"), cluster_secret="s" * 16))


def test_a_change_applied_while_a_stream_opens_reaches_it(tmp_path):
    r = leading_replica(tmp_path)
    try:
        apply(r, "user.create", {"name": "alice"})
        apply(r, "policy.set", {"text": ALLOW_ALL})
        for n in ("a", "b"):
            apply(r, "node.register", {"id": n, "name": n, "user": "alice", "machine_key": "m" + n,
                                       "node_key": "k" + n})
            apply(r, "node.approve", {"id": n})

        async def scenario():
            hub = StreamHub(r, CollectorRegistry())
            hub.start()
            try:
                on_feed = hub.on_feed

                async def first_then_delete(fn, *args):
                    first = await on_feed(fn, *args)  # computed: now b goes, before serving
                    deleted = apply(r, "node.delete", {"id": "b"})["version"]
                    assert await hub.wait_version(deleted, 10)
                    # the batch's fan-out was queued on the loop before this no-op's answer
                    # (call_soon_threadsafe is FIFO): it has run when this returns
                    await on_feed(lambda feed: None)
                    return first

                hub.on_feed = first_then_delete
                stream, first = await hub.open_stream("a", "127.0.0.1", None, "nonce-1")
                assert "b" in first.peers, "the first frame was computed before the delete"
                frames = stream.take_frames()
                assert any("b" in (json.loads(body).get("peers_removed") or ())
                           and version > first.version for _, version, body in frames), frames
            finally:
                await hub.stop()
        asyncio.run(scenario())
    finally:
        r.stop()
