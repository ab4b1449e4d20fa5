"""SCIM 2.0 provisioning against a real replica: scim2-tester's compliance checks, bad
requests refused in SCIM's error format, and deactivating or deleting a user revoking its
devices at once."""
from __future__ import annotations

import json

import httpx2
import pytest
from scim2_client.engines.httpx2 import SyncSCIMClient
from scim2_tester import Status, check_server

from proto_agent import ProtoAgent

USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
ERROR_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:Error"
PATCH_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
ALLOW_ALL = json.dumps({"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]})


@pytest.fixture(scope="module")
def scim(single_replica):
    c = single_replica
    status, created = c.request(c.replicas[0], "POST", "/api/v1/api-keys",
                                {"name": "okta", "scopes": ["scim"]})
    assert status == 201
    assert c.request(c.replicas[0], "PUT", "/api/v1/policy", ALLOW_ALL)[0] == 200
    base = c.replicas[0].api_url + "/scim/v2"

    def call(method: str, path: str, body=None, key: str | None = created["key"],
             content_type: str = "application/scim+json"):
        headers = {"Content-Type": content_type}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = body if isinstance(body, (str, bytes)) or body is None else json.dumps(body)
        resp = httpx2.request(method, base + path, content=data, headers=headers, timeout=10)
        return resp.status_code, (resp.json() if resp.content else None)
    call.key, call.cluster = created["key"], c
    return call


def audit_head(scim) -> dict:
    c = scim.cluster
    return c.request(c.replicas[0], "GET", "/api/v1/audit?limit=1")[1]["head"]


def new_user(scim, name: str, **extra) -> dict:
    status, user = scim("POST", "/Users", {"schemas": [USER_SCHEMA], "userName": name, **extra})
    assert status == 201, user
    return user


def test_scim2_tester_compliance_checks_pass(scim):
    client = SyncSCIMClient(httpx2.Client(base_url=scim.cluster.replicas[0].api_url + "/scim/v2",
                                          headers={"Authorization": f"Bearer {scim.key}"}))
    results = check_server(client)
    failed = [(r.title, r.reason) for r in results if r.status not in (Status.SUCCESS, Status.SKIPPED)]
    assert not failed
    assert sum(r.status == Status.SUCCESS for r in results) > 100


@pytest.mark.parametrize("key, status", [(None, 401), ("rmk_aaaaaaaaaaaa_wrong", 401), ("read", 403)])
def test_requests_without_the_scim_token_are_refused(scim, key, status):
    if key == "read":
        c = scim.cluster
        key = c.request(c.replicas[0], "POST", "/api/v1/api-keys",
                        {"name": "reader", "scopes": ["read"]})[1]["key"]
    before = audit_head(scim)
    got, err = scim("POST", "/Users", {"schemas": [USER_SCHEMA], "userName": "mallory"}, key=key)
    assert got == status and err["schemas"] == [ERROR_SCHEMA] and err["detail"]
    assert scim("GET", "/Users", key=key)[0] == status
    assert audit_head(scim) == before


@pytest.mark.parametrize("body, content_type", [
    ("{not json", "application/scim+json"),
    ({"schemas": [USER_SCHEMA]}, "application/scim+json"),  # no userName
    ({"schemas": [USER_SCHEMA], "userName": "erin", "favouriteColour": "red"}, "application/scim+json"),
    ({"schemas": [USER_SCHEMA], "userName": 7}, "application/scim+json"),
    ({"schemas": ["urn:example:not-a-user"], "userName": "erin"}, "application/scim+json"),
])
def test_malformed_bodies_and_unknown_attributes_change_nothing(scim, body, content_type):
    before = audit_head(scim)
    status, err = scim("POST", "/Users", body, content_type=content_type)
    assert status == 400, err
    assert err["schemas"] == [ERROR_SCHEMA] and err["detail"]
    assert audit_head(scim) == before
    assert scim("GET", '/Users?filter=userName eq "erin"')[1]["totalResults"] == 0


def test_filters_and_patch(scim):
    frank = new_user(scim, "frank@example.com", displayName="Frank")
    new_user(scim, "grace@example.com")
    status, found = scim("GET", '/Users?filter=userName eq "FRANK@example.com"')
    assert status == 200 and [u["id"] for u in found["Resources"]] == [frank["id"]]
    status, found = scim("GET", '/Users?filter=userName sw "grace"')
    assert [u["userName"] for u in found["Resources"]] == ["grace@example.com"]
    assert scim("GET", "/Users?filter=userName eq")[0] == 400  # a broken filter
    status, _ = scim("PATCH", f"/Users/{frank['id']}", {
        "schemas": [PATCH_SCHEMA], "Operations": [{"op": "replace", "path": "displayName",
                                                    "value": "Frank F."}]})
    assert status == 204  # RFC 7644 §3.5.2: no content unless attributes were asked for
    assert scim("GET", f"/Users/{frank['id']}")[1]["displayName"] == "Frank F."
    c = scim.cluster  # the SCIM User is the raftmesh user its userName names
    users = {u["name"]: u for u in c.request(c.replicas[0], "GET", "/api/v1/users")[1]["users"]}
    assert users["frank@example.com"]["display_name"] == "Frank F."
    status, dup = scim("POST", "/Users", {"schemas": [USER_SCHEMA], "userName": "Frank@Example.com"})
    assert status == 409 and dup["scimType"] == "uniqueness"


def _agents_of(scim, user: str, hosts: tuple[str, ...]) -> list[ProtoAgent]:
    c = scim.cluster
    key = c.request(c.replicas[0], "POST", "/api/v1/preauth-keys",
                    {"user": user, "reusable": True})[1]["key"]
    agents = [ProtoAgent(c, key, h) for h in hosts]
    for a in agents:
        a.connect()
        a.pump(lambda s: s.view.netmap is not None)
    return agents, key


@pytest.mark.parametrize("how", ["deactivate", "delete"])
def test_deactivating_or_deleting_a_user_revokes_all_its_devices(scim, how):
    name = f"henry-{how}"
    henry = new_user(scim, name)
    agents, key = _agents_of(scim, name, ("h1", "h2"))
    try:
        if how == "deactivate":
            status, _ = scim("PATCH", f"/Users/{henry['id']}", {
                "schemas": [PATCH_SCHEMA], "Operations": [{"op": "replace", "value": {"active": False}}]})
            assert status == 204
        else:
            assert scim("DELETE", f"/Users/{henry['id']}")[0] == 204
        for a in agents:
            a.pump(lambda s: "bye" in s.kinds)
            assert a.bye["code"] == "revoked"
        c = scim.cluster
        nodes = c.request(c.replicas[0], "GET", "/api/v1/nodes")[1]["nodes"]
        assert all(n["expired"] for n in nodes if n["id"] in {a.node_id for a in agents})
        with pytest.raises(Exception) as refused:  # its pre-auth key no longer registers anything
            ProtoAgent(c, key, "h3")
        assert "revoked" in str(refused.value) or "locked" in str(refused.value) \
            or "deactivated" in str(refused.value)
        entries = c.request(c.replicas[0], "GET", "/api/v1/audit?limit=1000")[1]["entries"]
        assert any(e["action"] in ("scim.put", "scim.delete") and e["target"] == f"node:{agents[0].node_id}"
                   for e in entries)
    finally:
        for a in agents:
            a.close()


def test_a_scim_group_in_the_policy_follows_its_membership(scim):
    """`group:idp/<name>` in the policy; adding a member reaches the running streams."""
    c = scim.cluster
    ivy, jack = new_user(scim, "ivy"), new_user(scim, "jack")
    status, group = scim("POST", "/Groups", {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
                                             "displayName": "Engineering",
                                             "members": [{"value": ivy["id"]}]})
    assert status == 201, group
    policy = json.dumps({"acls": [{"action": "accept", "src": ["group:idp/engineering"],
                                   "dst": ["group:idp/engineering:*"]}]})
    assert c.request(c.replicas[0], "PUT", "/api/v1/policy", policy)[0] == 200
    (a,), _ = _agents_of(scim, "ivy", ("ivy-laptop",))
    (b,), _ = _agents_of(scim, "jack", ("jack-laptop",))
    try:
        assert b.node_id not in a.peers() and a.node_id not in b.peers()
        add = {"schemas": [PATCH_SCHEMA], "Operations": [
            {"op": "add", "path": "members", "value": [{"value": jack["id"]}]}]}
        assert scim("PATCH", f"/Groups/{group['id']}", add)[0] in (200, 204)
        a.pump(lambda s: b.node_id in s.peers())
        b.pump(lambda s: a.node_id in s.peers())
        remove = {"schemas": [PATCH_SCHEMA], "Operations": [
            {"op": "remove", "path": f'members[value eq "{jack["id"]}"]'}]}
        assert scim("PATCH", f"/Groups/{group['id']}", remove)[0] in (200, 204)
        a.pump(lambda s: b.node_id not in s.peers())
    finally:
        a.close()
        b.close()
        assert c.request(c.replicas[0], "PUT", "/api/v1/policy", ALLOW_ALL)[0] == 200
