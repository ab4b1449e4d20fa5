"""The policy routes in process (one replica, its app on a test server): parsing never
holds the event loop (the test holds the parser mid-way, no timing involved), answers show
the text as written, and tags are checked against the stored policy's tagOwners."""
import asyncio
import json
import threading
from contextlib import asynccontextmanager

import pytest
from aiohttp.test_utils import TestClient, TestServer

from raftmesh.api import admin, auth
from raftmesh.api.errors import APIError
from raftmesh.cluster.policy import MAX_POLICY_BYTES
from raftmesh.api.map_stream import HUB
from raftmesh.api.server import build_app

from test_stream_open_order import ALLOW_ALL, apply, leading_replica


@asynccontextmanager
async def served(r):
    """(test client, stream hub) of `r`'s app, as api/server.py runs it."""
    app = build_app(r)
    app[HUB].start()
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield client, app[HUB]
    finally:
        await client.close()
        await app[HUB].stop()


def admin_token(r) -> str:
    key_id, token, hashed = auth.new_secret_token("rmk")
    apply(r, "apikey.bootstrap", {"id": key_id, "name": "t", "scopes": ["admin"], "hash": hashed})
    return token


def test_healthz_is_answered_while_a_policy_is_being_validated(tmp_path, monkeypatch):
    r = leading_replica(tmp_path)
    parsing, release = threading.Event(), threading.Event()
    real = admin.parsed_policy

    def held_parser(text):
        parsing.set()
        assert release.wait(30), "the test never released the parser"
        return real(text)

    monkeypatch.setattr(admin, "parsed_policy", held_parser)
    try:
        token = admin_token(r)

        async def scenario():
            async with served(r) as (client, _):
                try:
                    validating = asyncio.ensure_future(client.post(
                        "/api/v1/policy/validate", data=ALLOW_ALL,
                        headers={"Authorization": f"Bearer {token}", "Content-Type": "text/plain"}))
                    assert await asyncio.get_running_loop().run_in_executor(None, parsing.wait, 30)
                    health = await asyncio.wait_for(client.get("/healthz"), 30)
                    assert health.status == 200 and not validating.done()
                    release.set()
                    answer = await asyncio.wait_for(validating, 30)
                    assert answer.status == 200 and await answer.json() == {"valid": True,
                                                                            "warnings": []}
                finally:
                    release.set()
        asyncio.run(scenario())
    finally:
        r.stop()


def test_answers_show_the_text_and_tags_follow_the_stored_tag_owners(tmp_path):
    r = leading_replica(tmp_path)
    text = '{"tagOwners": {"tag:web": ["alice"],}, // HuJSON\n "acls": []}'
    try:
        token = admin_token(r)
        apply(r, "user.create", {"name": "alice"})

        async def scenario():
            async with served(r) as (client, _):
                auth_header = {"Authorization": f"Bearer {token}"}
                put = await client.put("/api/v1/policy", data=text,
                                       headers={**auth_header, "Content-Type": "text/plain"})
                assert put.status == 200, await put.text()
                got = await (await client.get("/api/v1/policy", headers=auth_header)).json()
                assert got["policy"]["text"] == text and "compiled" not in got["policy"]
                versions = await (await client.get("/api/v1/policy/versions?include_text=true",
                                                   headers=auth_header)).json()
                assert [set(v) & {"text", "compiled"} for v in versions["versions"]] == [{"text"}]
                for tag, status in (("tag:web", 201), ("tag:db", 400)):
                    resp = await client.post("/api/v1/preauth-keys", headers=auth_header,
                                             json={"user": "alice", "tags": [tag]})
                    assert resp.status == status, await resp.text()
                assert "tag:db is not in tagOwners" in await resp.text()
        asyncio.run(scenario())
    finally:
        r.stop()


def test_a_policy_over_the_size_limit_is_a_413_naming_the_limit():
    """Reachable when max_body_bytes is raised above the policy limit."""
    text = '{"acls": []}' + " " * MAX_POLICY_BYTES
    with pytest.raises(APIError) as e:
        admin.parsed_policy(text)
    assert (e.value.status, e.value.code) == (413, "payload_too_large")
    assert f"the limit is {MAX_POLICY_BYTES}" in e.value.message


TAILSCALE_STYLE = """{
  "groups": {"group:eng": ["ada@example.com"]},
  "grants": [{"src": ["group:eng"], "dst": ["*"], "ip": ["tcp:22", "443"]}],
  "ssh": [{"action": "check", "src": ["autogroup:member"], "dst": ["autogroup:self"],
           "users": ["autogroup:nonroot", "root"]}],
  "nodeAttrs": [{"target": ["autogroup:member"], "attr": ["funnel"]}],
  "tests": [{"src": "ada@example.com", "accept": ["100.64.0.9:22"], "deny": ["100.64.0.9:80"]}],
}"""


def test_a_tailscale_policy_with_email_users_is_stored_with_its_warnings_answered_and_audited(
        tmp_path):
    r = leading_replica(tmp_path)
    try:
        token = admin_token(r)

        async def scenario():
            async with served(r) as (client, _):
                auth_header = {"Authorization": f"Bearer {token}"}
                text = {**auth_header, "Content-Type": "text/plain"}
                made = await client.post("/api/v1/users", headers=auth_header,
                                         json={"name": "ada@example.com"})
                assert made.status == 201, await made.text()
                bad = await client.post("/api/v1/users", headers=auth_header,
                                        json={"name": "ada@example.com\n"})
                assert bad.status == 400 and "not a valid user name" in await bad.text()
                codes = ["ssh_not_enforced", "node_attrs_not_enforced"]
                valid = await (await client.post("/api/v1/policy/validate", data=TAILSCALE_STYLE,
                                                 headers=text)).json()
                assert [w["code"] for w in valid["warnings"]] == codes
                assert [w["path"] for w in valid["warnings"]] == ["ssh", "nodeAttrs"]
                put = await client.put("/api/v1/policy", data=TAILSCALE_STYLE, headers=text)
                assert put.status == 200, await put.text()
                assert (await put.json())["warnings"] == valid["warnings"]
                got = await (await client.get("/api/v1/policy", headers=auth_header)).json()
                assert got["policy"]["warnings"] == valid["warnings"]
                audit = await (await client.get("/api/v1/audit?action=policy.set",
                                                headers=auth_header)).json()
                (entry,) = audit["entries"]
                assert entry["after"]["warnings"] == sorted(codes), entry
        asyncio.run(scenario())
    finally:
        r.stop()
