"""A command a release added is proposed only once every member's release applies it."""
import asyncio
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from nacl.signing import SigningKey

from raftmesh.agent.control_client import ControlClient
from raftmesh.api.command_gate import COMMANDS_PATH, NEEDS_EVERY_MEMBER, CommandGate, all_members_apply
from raftmesh.cluster.commands import COMMANDS
from raftmesh.proto.routes import REGISTER

from test_agent_register import node_key, preauth
from waiting import wait_until

BATCH = "node.register_batch"


def test_an_op_is_allowed_only_when_every_member_said_it_applies_it():
    both = frozenset({BATCH, "user.create"})
    assert all_members_apply(BATCH, ["a", "b"], {"a": both, "b": both})
    assert not all_members_apply(BATCH, ["a", "b"], {"a": both, "b": frozenset({"user.create"})})
    assert not all_members_apply(BATCH, ["a", "b"], {"a": both}), "a member that never answered"
    assert not all_members_apply(BATCH, [], {"a": both}), "no membership known yet"
    assert BATCH in NEEDS_EVERY_MEMBER and "user.create" not in NEEDS_EVERY_MEMBER
    assert all(COMMANDS[op].needs_every_member for op in NEEDS_EVERY_MEMBER)


def test_a_member_that_answers_anything_but_its_list_knows_no_op():
    """An older release (no endpoint: 404), a broken answer, or nobody listening."""
    async def scenario():
        async def listing(_):
            return web.json_response({"commands": [BATCH, 7]})

        async def garbage(_):
            return web.Response(text="{not json", content_type="application/json")

        async def not_a_list(_):
            return web.json_response({"commands": BATCH})

        app = web.Application()
        app.router.add_get("/new" + COMMANDS_PATH, listing)
        app.router.add_get("/garbled" + COMMANDS_PATH, garbage)
        app.router.add_get("/odd" + COMMANDS_PATH, not_a_list)
        async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as http:
            base = str(server.make_url(""))
            asked = [await CommandGate._ask(http, base + path) for path in ("/new", "/old", "/garbled", "/odd")]
            nobody = await CommandGate._ask(http, "http://127.0.0.1:9")  # discard port: refused
        return asked, nobody

    asked, nobody = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert asked == [frozenset({BATCH}), frozenset(), frozenset(), frozenset()]
    assert nobody == frozenset()


def held_back(cluster, r) -> float:
    status, text = cluster.request(r, "GET", "/metrics")
    assert status == 200
    line = next(ln for ln in text.splitlines() if ln.startswith("raftmesh_commands_held_back "))
    return float(line.split()[-1])


def test_group_commit_is_held_back_while_a_member_does_not_answer(make_cluster):
    """Real replicas: each asks the others which commands they apply; while one is paused
    (it could as well be an older release), registrations go one entry each and still
    succeed, and batching returns once it answers again."""
    c = make_cluster(3)
    r1, r2, r3 = c.replicas
    wait_until(lambda: held_back(c, r1) == 0, timeout=20, what="every member said it applies node.register_batch")
    status, body = c.request(r2, "GET", COMMANDS_PATH)
    assert status == 200 and BATCH in body["commands"] and sorted(body["commands"]) == sorted(COMMANDS)
    key = preauth(c, reusable=True)
    os.kill(r3.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: held_back(c, r1) == 1, timeout=20, what="node.register_batch held back")

        def register(machine):
            return ControlClient([r1.api_url], machine).call(
                "POST", REGISTER, {"node_key": node_key(), "hostname": "gated", "auth_key": key})

        with ThreadPoolExecutor(8) as pool:
            nodes = list(pool.map(register, [SigningKey.generate() for _ in range(8)]))
        assert len({n["node"]["id"] for n in nodes}) == 8
    finally:
        os.kill(r3.pid, signal.SIGCONT)
    wait_until(lambda: held_back(c, r1) == 0, timeout=20, what="batching allowed again")
