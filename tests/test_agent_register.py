"""Agent registration: machine-key signatures, pre-auth keys, nothing stored on refusal."""
import base64
import json
import secrets
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey
from waiting import wait_until

from raftmesh.agent.control_client import ControlClient, ControlError
from raftmesh.api.cluster_clock import WARMUP
from raftmesh.proto.machine_auth import HEADER_KEY, sign_headers
from raftmesh.proto.routes import MAP, REGISTER, REPORT
from raftmesh.proto.version import (HEADER_PROTOCOL_VERSION, HISTORY, OLDEST_SERVED, PROTOCOL_VERSION,
                                    UNSUPPORTED, VersionError, requested_version)


def node_key() -> str:
    return base64.b64encode(bytes(PrivateKey.generate().public_key)).decode()


def client(cluster, i=0) -> ControlClient:
    return ControlClient([cluster.replicas[i].api_url], SigningKey.generate())


def preauth(cluster, **kw) -> str:
    user = kw.pop("user", "agents")
    cluster.request(cluster.replicas[0], "POST", "/api/v1/users", {"name": user})
    status, body = cluster.request(cluster.replicas[0], "POST", "/api/v1/preauth-keys", {"user": user, **kw})
    assert status == 201, body
    return body["key"]


def node_count(cluster) -> int:
    return len(cluster.request(cluster.replicas[0], "GET", "/api/v1/nodes")[1]["nodes"])


def test_register_with_preauth_key_is_approved_with_addresses(shared_cluster):
    c = shared_cluster
    key = preauth(c, reusable=True)
    a = client(c, 1)
    resp = a.call("POST", REGISTER, {"node_key": node_key(), "hostname": "Laptop", "auth_key": key})
    node = resp["node"]
    assert resp["approved"] and node["user"] == "agents" and node["name"] == "laptop"
    assert node["ipv4"].startswith("100.") and node["ipv6"].startswith("fd7a:115c:a1e0:")
    assert resp["cluster_keys"] and all(len(base64.b64decode(k["public_key"])) == 32 for k in resp["cluster_keys"])
    assert "machine_key" in node and "hash" not in node
    again = a.call("POST", REGISTER, {"node_key": node_key(), "hostname": "laptop"})
    assert again["node"]["id"] == node["id"], "re-registration of a known machine returns its node"


def test_concurrent_registrations_of_one_machine_on_every_replica_give_one_node(shared_cluster):
    """No replica reads before it writes a new machine's registration: the ones that lose
    the race are refused at apply, catch up and answer the node that won."""
    c = shared_cluster
    key, machine = preauth(c, reusable=True), SigningKey.generate()
    agents = [ControlClient([r.api_url], machine) for r in c.replicas for _ in range(2)]
    before = node_count(c)
    with ThreadPoolExecutor(len(agents)) as pool:
        answers = list(pool.map(lambda a: a.call("POST", REGISTER, {
            "node_key": node_key(), "hostname": "racer", "auth_key": key}), agents))
    assert len({a["node"]["id"] for a in answers}) == 1 and all(a["approved"] for a in answers)
    assert node_count(c) == before + 1


def test_register_without_key_is_pending_until_approved(shared_cluster):
    c = shared_cluster
    resp = client(c, 2).call("POST", REGISTER, {"node_key": node_key(), "hostname": "pending-box"})
    assert resp["approved"] is False
    node_id = resp["node"]["id"]
    status, body = c.request(c.replicas[0], "POST", f"/api/v1/nodes/{node_id}/approve")
    assert status == 200 and body["node"]["approved"] is True


@pytest.mark.parametrize("problem", ["unknown", "malformed", "wrong-secret", "used-up", "expired", "revoked"])
def test_bad_preauth_keys_are_refused_and_nothing_is_stored(shared_cluster, problem):
    c = shared_cluster
    key = preauth(c)
    key_id = key.split("_")[1]
    if problem == "unknown":
        key = f"rmp_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"
    elif problem == "malformed":
        key = "not-a-key"
    elif problem == "wrong-secret":
        key = key.rsplit("_", 1)[0] + "_" + secrets.token_urlsafe(32)
    elif problem == "used-up":
        client(c).call("POST", REGISTER, {"node_key": node_key(), "hostname": "first", "auth_key": key})
    elif problem == "expired":
        status, body = c.request(c.replicas[0], "POST", "/api/v1/preauth-keys",
                                 {"user": "agents", "expiration_seconds": 1})
        key = body["key"]
        deadline = time.monotonic() + 5
        while time.time() < body["preauth_key"]["expires_at"] and time.monotonic() < deadline:
            time.sleep(0.05)
    elif problem == "revoked":
        assert c.request(c.replicas[0], "DELETE", f"/api/v1/preauth-keys/{key_id}")[0] == 200
    before = node_count(c)
    with pytest.raises(ControlError) as e:
        client(c, 1).call("POST", REGISTER, {"node_key": node_key(), "hostname": "x", "auth_key": key})
    assert e.value.status == 401 and e.value.code == "unauthenticated"
    assert "pre-auth key" in e.value.message
    assert node_count(c) == before


def raw_register(cluster, headers, body: bytes):
    req = urllib.request.Request(cluster.replicas[0].api_url + REGISTER, data=body,
                                 method="POST", headers={**headers, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_forged_stale_and_replayed_signatures_are_refused(shared_cluster):
    c = shared_cluster
    body = json.dumps({"node_key": node_key(), "hostname": "sig-test"}).encode()
    key = SigningKey.generate()
    before = node_count(c)
    # Forged: signed by another key than the one claimed.
    forged = sign_headers(SigningKey.generate(), "POST", REGISTER, body, time.time(), "n" * 16)
    forged[HEADER_KEY] = sign_headers(key, "POST", "/", b"", time.time(), "m" * 16)[HEADER_KEY]
    assert raw_register(c, forged, body)[0] == 401
    # Tampered body.
    h = sign_headers(key, "POST", REGISTER, body, time.time(), "t" * 16)
    assert raw_register(c, h, body.replace(b"sig-test", b"sig-evil"))[0] == 401
    # Stale. A replica that cannot tell whose clock is off (up for less than the cluster
    # clock's warm-up, too few of the others' writes applied) says 503 until it can.
    h = sign_headers(key, "POST", REGISTER, body, time.time() - 120, "s" * 16)
    status, err = wait_until(lambda: (lambda a: a if a[0] != 503 else None)(raw_register(c, h, body)),
                             WARMUP + 5, what="the replica's verdict on the agent's clock")
    assert status == 401 and "clock" in err["error"]["message"]
    assert node_count(c) == before
    # Fresh, then replayed byte for byte.
    h = sign_headers(key, "POST", REGISTER, body, time.time(), secrets.token_hex(8))
    assert raw_register(c, h, body)[0] == 200
    status, err = raw_register(c, h, body)
    assert status == 401 and "replayed" in err["error"]["message"]


def test_malformed_register_bodies_are_refused(shared_cluster):
    c = shared_cluster
    a = client(c)
    for bad in ({"hostname": "x"}, {"node_key": "short", "hostname": "x"},
                {"node_key": node_key(), "hostname": "bad host"},
                {"node_key": node_key(), "hostname": "x", "extra": 1},
                {"node_key": node_key(), "hostname": "x", "endpoints": ["not-an-endpoint"]}):
        with pytest.raises(ControlError) as e:
            a.call("POST", REGISTER, bad)
        assert e.value.status == 400 and e.value.code == "validation_failed"


def test_protocol_versions_a_replica_cannot_serve_are_refused_clearly(shared_cluster):
    """A version outside what the replica serves gets 426 naming what it serves and what to
    upgrade; a malformed one 400; neither registers anything. Without the header (agents
    from before it existed) a request is version 1, as raw_register's above show."""
    c = shared_cluster
    key = SigningKey.generate()
    body = json.dumps({"node_key": node_key(), "hostname": "version-test"}).encode()
    before = node_count(c)

    def attempt(version: str):
        h = sign_headers(key, "POST", REGISTER, body, time.time(), secrets.token_hex(8))
        return raw_register(c, {**h, HEADER_PROTOCOL_VERSION: version}, body)

    status, err = attempt(str(PROTOCOL_VERSION + 1))
    assert (status, err["error"]["code"]) == (426, UNSUPPORTED), err
    served = (f"version {PROTOCOL_VERSION}" if OLDEST_SERVED == PROTOCOL_VERSION
              else f"versions {OLDEST_SERVED} to {PROTOCOL_VERSION}")
    assert served in err["error"]["message"]
    assert "upgrade the replicas" in err["error"]["message"]
    status, err = attempt("0")
    assert (status, err["error"]["code"]) == (426, UNSUPPORTED) and "upgrade the agent" in err["error"]["message"]
    for malformed in ("one", "-1", "1.0", "9" * 40):
        status, err = attempt(malformed)
        assert (status, err["error"]["code"]) == (400, "bad_request"), malformed
        assert HEADER_PROTOCOL_VERSION in err["error"]["message"]
    assert node_count(c) == before
    assert attempt(str(PROTOCOL_VERSION))[0] == 200
    # The map stream checks it before anything else (this machine is pending, not refused).
    h = {**sign_headers(key, "GET", MAP, b"", time.time(), secrets.token_hex(8)),
         HEADER_PROTOCOL_VERSION: str(PROTOCOL_VERSION + 1)}
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(c.replicas[0].api_url + MAP, headers=h), timeout=10)
    assert e.value.code == 426 and json.loads(e.value.read())["error"]["code"] == UNSUPPORTED


def test_requested_version_parses_the_header():
    assert requested_version(None) == 1
    assert requested_version(str(PROTOCOL_VERSION)) == PROTOCOL_VERSION
    with pytest.raises(VersionError) as e:
        requested_version(str(PROTOCOL_VERSION + 1))
    assert not e.value.malformed
    with pytest.raises(VersionError) as e:
        requested_version("v1")
    assert e.value.malformed
    assert set(HISTORY) == set(range(1, PROTOCOL_VERSION + 1)) and OLDEST_SERVED <= PROTOCOL_VERSION


def test_the_daemon_reports_a_refused_protocol_version_and_waits(shared_cluster, tmp_path, monkeypatch, caplog):
    """An agent newer than the replicas: `agent status` and the log say what to upgrade, and
    the next attempt is a minute away, on the next replica (no data plane is started)."""
    import logging

    from raftmesh.agent.daemon import Agent, AgentConfig
    from raftmesh.agent.session import VERSION_RETRY, Next
    from raftmesh.proto import version
    monkeypatch.setattr(version, "PROTOCOL_VERSION", PROTOCOL_VERSION + 1)  # what it sends
    before = node_count(shared_cluster)
    agent = Agent(AgentConfig([r.api_url for r in shared_cluster.replicas], str(tmp_path / "state"),
                              "rmtest0", hostname="newer"))
    try:
        with caplog.at_level(logging.ERROR, logger="raftmesh.agent"):
            nxt = agent._attempt()
            agent._follow(Next(0.0, rotate=nxt.rotate))  # everything _follow does but the wait
        assert nxt == Next(VERSION_RETRY, rotate=True) and agent.client.current == 1
        with open(tmp_path / "state" / "status.json") as f:
            status = json.load(f)
        assert status["state"] == "unsupported_protocol", status
        served = (f"version {PROTOCOL_VERSION}" if OLDEST_SERVED == PROTOCOL_VERSION
                  else f"versions {OLDEST_SERVED} to {PROTOCOL_VERSION}")
        assert "upgrade the replicas" in status["error"] and served in status["error"]
        assert "Upgrade the agent" in caplog.text
        assert node_count(shared_cluster) == before  # refused: nothing registered
    finally:
        agent.ack_sender.close()


def test_routes_that_are_not_cidrs_are_refused_and_nothing_is_stored(shared_cluster):
    c = shared_cluster
    key = preauth(c, reusable=True)
    a = client(c)
    before = node_count(c)
    for bad in (["10.1.0.1/24"], ["bogus/8"], ["10.1.0.0"]):
        with pytest.raises(ControlError) as e:
            a.call("POST", REGISTER, {"node_key": node_key(), "hostname": "router", "auth_key": key,
                                      "advertised_routes": bad})
        assert e.value.status == 400 and e.value.code == "invalid_route" and "not a CIDR" in e.value.message
    assert node_count(c) == before
    node = a.call("POST", REGISTER, {"node_key": node_key(), "hostname": "router", "auth_key": key,
                                     "advertised_routes": ["10.1.0.0/24"]})["node"]
    for bad in ({"advertised_routes": ["10.1.0.1/24"]}, {"unreachable_routes": ["xyz"]}):
        with pytest.raises(ControlError) as e:
            a.call("POST", REPORT, bad)
        assert e.value.status == 400 and e.value.code == "invalid_route"
    status, now = c.request(c.replicas[0], "GET", f"/api/v1/nodes/{node['id']}")
    assert now["node"]["advertised_routes"] == ["10.1.0.0/24"]
    assert a.call("POST", REPORT, {"unreachable_routes": ["10.1.0.0/24"]})["node"][
        "unreachable_routes"] == ["10.1.0.0/24"]
