"""Lock-down against a real replica: one call locks a user (every device revoked, keys
stop working, re-registration refused until unlocked) or a device; the audit log says who
and why; an admin-approved node gets an owner."""
from __future__ import annotations

import base64
import json

import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from proto_agent import ProtoAgent
from raftmesh.agent.control_client import ControlClient, ControlError
from raftmesh.proto.routes import REGISTER

ALLOW_ALL = json.dumps({"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]})


@pytest.fixture(scope="module")
def mesh(single_replica):
    c = single_replica
    admin = lambda m, p, b=None: c.request(c.replicas[0], m, p, b)
    assert admin("PUT", "/api/v1/policy", ALLOW_ALL)[0] == 200
    return c, admin


def _user(admin, name: str) -> str:
    assert admin("POST", "/api/v1/users", {"name": name})[0] == 201
    return admin("POST", "/api/v1/preauth-keys", {"user": name, "reusable": True})[1]["key"]


def _streaming(c, key: str, host: str) -> ProtoAgent:
    a = ProtoAgent(c, key, host)
    a.connect()
    a.pump(lambda s: s.view.netmap is not None)
    return a


def _register(c, key: str | None, machine=None):
    client = ControlClient([c.replicas[0].api_url], machine or SigningKey.generate())
    body = {"node_key": base64.b64encode(bytes(PrivateKey.generate().public_key)).decode(),
            "hostname": "again"}
    if key:
        body["auth_key"] = key
    return client.signed_request("POST", REGISTER, body)


def test_locking_a_user_revokes_everything_until_unlocked(mesh):
    c, admin = mesh
    key, other = _user(admin, "kim"), _user(admin, "lee")
    k1, k2, watcher = _streaming(c, key, "kim1"), _streaming(c, key, "kim2"), _streaming(c, other, "lee1")
    try:
        watcher.pump(lambda s: {k1.node_id, k2.node_id} <= s.peers())
        status, locked = admin("POST", "/api/v1/users/kim/lock", {"reason": "laptop stolen"})
        assert status == 200, locked
        assert sorted(n["id"] for n in locked["revoked"]) == sorted([k1.node_id, k2.node_id])
        for a in (k1, k2):
            a.pump(lambda s: "bye" in s.kinds)
            assert a.bye["code"] == "revoked"
        watcher.pump(lambda s: not ({k1.node_id, k2.node_id} & s.peers()))
        with pytest.raises(ControlError) as e:  # the pre-auth key stopped working
            _register(c, key)
        assert e.value.status == 401 and "revoked" in e.value.message
        fresh = admin("POST", "/api/v1/preauth-keys", {"user": "kim"})[1]["key"]
        with pytest.raises(ControlError) as e:  # and a new one is refused while locked
            _register(c, fresh)
        assert (e.value.status, e.value.code) == (403, "user_locked")
        assert "locked by an admin" in e.value.message
        entry = next(e for e in admin("GET", "/api/v1/audit?action=user.lock&limit=100")[1]["entries"]
                     if e["target"] == "user:kim")
        assert entry["actor"].startswith("apikey:")
        assert entry["after"]["locked"]["reason"] == "laptop stolen"
        assert admin("POST", "/api/v1/users/kim/lock", {"reason": "again"})[0] == 409
        assert admin("POST", "/api/v1/users/kim/unlock")[0] == 200
        assert _register(c, fresh)["approved"]  # unlocked: a new key registers again
    finally:
        for a in (k1, k2, watcher):
            a.close()


def test_locking_a_device_refuses_its_machine_until_unlocked(mesh):
    c, admin = mesh
    key = _user(admin, "max")
    a = _streaming(c, key, "max1")
    try:
        status, locked = admin("POST", f"/api/v1/nodes/{a.node_id}/lock", {"reason": "malware alert"})
        assert status == 200 and locked["node"]["expired"] and locked["node"]["locked"]["reason"]
        a.pump(lambda s: "bye" in s.kinds)
        with pytest.raises(ControlError) as e:  # re-authenticating the same machine
            _register(c, key, a.key)
        assert (e.value.status, e.value.code) == (403, "user_locked")
        assert admin("POST", f"/api/v1/nodes/{a.node_id}/approve")[0] == 403
        assert admin("POST", f"/api/v1/nodes/{a.node_id}/unlock")[0] == 200
        assert not _register(c, key, a.key)["expired"]
    finally:
        a.close()


@pytest.mark.parametrize("path, body, status", [
    ("/api/v1/users/kim/lock", None, 400),
    ("/api/v1/users/kim/lock", {"reason": ""}, 400),
    ("/api/v1/users/kim/lock", {"reason": "x", "extra": 1}, 400),
    ("/api/v1/users/nobody/lock", {"reason": "x"}, 404),
    ("/api/v1/nodes/nzzz/lock", {"reason": "x"}, 404),
    ("/api/v1/users/nobody/unlock", None, 404),
])
def test_bad_lock_requests_change_nothing(mesh, path, body, status):
    c, admin = mesh
    before = admin("GET", "/api/v1/audit?limit=1")[1]["head"]
    assert admin("POST", path, body)[0] == status
    assert admin("GET", "/api/v1/audit?limit=1")[1]["head"] == before


def test_an_approved_pending_node_gets_an_owner(mesh):
    c, admin = mesh
    _user(admin, "ned")
    pending = _register(c, None)["node"]
    assert pending["user"] is None
    assert admin("POST", f"/api/v1/nodes/{pending['id']}/approve?user=nobody")[0] == 404
    status, approved = admin("POST", f"/api/v1/nodes/{pending['id']}/approve?user=ned")
    assert status == 200 and approved["node"]["user"] == "ned" and approved["node"]["approved"]
    assert admin("GET", "/api/v1/nodes?user=ned")[1]["nodes"][0]["id"] == pending["id"]
