"""Policy requests never hold a replica's event loop: parsing a large policy runs in a
worker while /healthz and other requests are answered. In process: one replica and its app
on a test server, with the parser held mid-way by the test (no timing involved)."""
import asyncio
import threading

from aiohttp.test_utils import TestClient, TestServer

from raftmesh.api import admin, auth
from raftmesh.api.map_stream import HUB
from raftmesh.api.server import build_app

from test_stream_open_order import ALLOW_ALL, apply, leading_replica


def test_healthz_is_answered_while_a_policy_is_being_validated(tmp_path, monkeypatch):
    r = leading_replica(tmp_path)
    key_id, token, hashed = auth.new_secret_token("rmk")
    parsing, release = threading.Event(), threading.Event()
    real = admin.compiled_policy

    def held_parser(text):
        parsing.set()
        assert release.wait(30), "the test never released the parser"
        return real(text)

    monkeypatch.setattr(admin, "compiled_policy", held_parser)
    try:
        apply(r, "apikey.bootstrap", {"id": key_id, "name": "t", "scopes": ["admin"], "hash": hashed})

        async def scenario():
            app = build_app(r)
            app[HUB].start()
            client = TestClient(TestServer(app))
            await client.start_server()
            try:
                validating = asyncio.ensure_future(client.post(
                    "/api/v1/policy/validate", data=ALLOW_ALL,
                    headers={"Authorization": f"Bearer {token}", "Content-Type": "text/plain"}))
                assert await asyncio.get_running_loop().run_in_executor(None, parsing.wait, 30)
                health = await asyncio.wait_for(client.get("/healthz"), 30)
                assert health.status == 200 and not validating.done()
                release.set()
                answer = await asyncio.wait_for(validating, 30)
                assert answer.status == 200 and await answer.json() == {"valid": True}
            finally:
                release.set()
                await client.close()
                await app[HUB].stop()
        asyncio.run(scenario())
    finally:
        r.stop()
