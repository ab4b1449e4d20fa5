"""The map stream over real replica processes, spoken by protocol-exact test agents.

Covers: first frame full, deltas on policy and peer changes, keepalives, resume with a
version on another replica, revocation closing the stream with a bye, signatures checked
against pinned keys (including across a cluster-key rotation) and stream tags, presence and
acks in the admin API, and the refusals (pending, expired, unregistered, unsigned, replayed).
"""
from __future__ import annotations

import base64
import json
import secrets
import time
from collections import Counter

import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from raftmesh.agent.control_client import ControlClient, ControlError
from raftmesh.agent.map_client import MapStream
from raftmesh.agent.netmap_state import AgentNetmap
from raftmesh.proto.frames import FrameError, FrameReader, stream_keypair
from raftmesh.api.map_stream import KEEPALIVE_TICKS, Stream, keepalive_quiet_limits, quiet_limit
from raftmesh.proto.wire import HEADER_STREAM_KEY
from raftmesh.proto.routes import ACK, MAP, REGISTER, REPORT
from raftmesh.proto.machine_auth import HEADER_NONCE

from proto_agent import ProtoAgent
from waiting import wait_until

ALLOW_ALL = json.dumps({"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]})
ONLY_SSH_TO_ALICE = json.dumps({"acls": [{"action": "accept", "src": ["bob"], "dst": ["alice:22"]}]})


@pytest.fixture
def mesh(make_cluster):
    c = make_cluster(3, extra_args=["--stream-keepalive", "1"])
    admin = lambda m, p, b=None: c.request(c.replicas[0], m, p, b)
    for user in ("alice", "bob"):
        assert admin("POST", "/api/v1/users", {"name": user})[0] == 201
    keys = {u: admin("POST", "/api/v1/preauth-keys", {"user": u, "reusable": True})[1]["key"]
            for u in ("alice", "bob")}
    assert admin("PUT", "/api/v1/policy", ALLOW_ALL)[0] == 200
    agents = []

    def agent(user, host, replica=0):
        a = ProtoAgent(c, keys[user], host, replica)
        agents.append(a)
        return a
    yield c, admin, agent
    for a in agents:
        a.close()


def test_full_then_deltas_keepalives_and_acks(mesh):
    c, admin, agent = mesh
    a, b = agent("alice", "a", 0), agent("bob", "b", 1)
    a.connect()
    a.pump(lambda s: s.view.netmap is not None and b.node_id in s.peers())
    assert a.kinds[0] == "full" and a.view.netmap.self_node.id == a.node_id
    assert admin("PUT", "/api/v1/policy", ONLY_SSH_TO_ALICE)[0] == 200
    a.pump(lambda s: s.view.netmap.packet_filter and
           s.view.netmap.packet_filter[0].dst[0].ports.first == 22)
    assert "delta" in a.kinds
    a.pump(lambda s: "keepalive" in s.kinds, timeout=5)
    # the agent acknowledges; the admin API shows presence, replica and acked version
    version = a.view.version
    a.client.current = 0
    assert a.client.call("POST", ACK, {"version": version})["streaming_here"] is True
    def node_stream():
        return admin("GET", f"/api/v1/nodes/{a.node_id}")[1]["node"]
    wait_until(lambda: node_stream()["online"] and node_stream()["stream"]["acked_version"] == version,
               timeout=10)
    info = node_stream()
    assert info["stream_replica"] == c.replicas[0].id and info["stream"]["replica"] == c.replicas[0].id
    metrics = c.request(c.replicas[0], "GET", "/metrics")[1]
    assert "raftmesh_netmap_propagation_seconds_count" in metrics
    assert "raftmesh_map_streams 1.0" in metrics


def test_keepalives_of_streams_that_went_quiet_together_are_spread_within_the_period():
    """Each keepalive costs a signature and a verification: streams quiet since the same
    delta must not all get theirs at the same tick, and none may wait past the period
    (agents fail over after twice the period without a frame)."""
    for period in (1.0, 10.0, 15.0):
        limits = keepalive_quiet_limits(period)
        assert limits[0] >= period / 2 and limits[-1] + period / KEEPALIVE_TICKS <= period + 1e-9
        by_limit = Counter(quiet_limit(limits, Stream("n", None, "x").session) for _ in range(4000))
        assert len(by_limit) == 4 and min(by_limit.values()) > 800, by_limit


def _histogram(c, replica, name: str) -> dict[str, float]:
    """Bucket upper bound -> cumulative count, and 'count', from a replica's /metrics."""
    out = {}
    for line in c.request(replica, "GET", "/metrics")[1].splitlines():
        if line.startswith(name + "_bucket{"):
            out[line.split('le="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(name + "_count "):
            out["count"] = float(line.rsplit(" ", 1)[1])
    return out


def test_one_coalesced_ack_covers_several_versions_with_their_apply_ages(mesh):
    """A deferred ack lists when each version was applied (as an age): the replica counts
    one sample per change it streamed, timed to the apply, not to the late ack."""
    c, admin, agent = mesh
    a, b = agent("alice", "a", 0), agent("bob", "b", 1)
    a.connect()
    a.pump(lambda s: s.view.netmap is not None and b.node_id in s.peers())
    applied = []
    for name in ("one", "two", "three"):
        assert admin("PATCH", f"/api/v1/nodes/{b.node_id}", {"name": name})[0] == 200
        a.pump(lambda s, name=name: s.view.netmap.peers[b.node_id].name == name)
        applied.append(a.view.version)
    before = _histogram(c, c.replicas[0], "raftmesh_netmap_propagation_seconds")
    a.client.current = 0
    # the ages say every change was applied at once: the samples must land in the lowest bucket
    # although this ack arrives long after (an ack without ages would time the ack itself)
    reply = a.client.call("POST", ACK, {"version": applied[-1],
                                                   "applied": [[v, 3600.0] for v in applied]})
    assert reply["streaming_here"] is True
    after = _histogram(c, c.replicas[0], "raftmesh_netmap_propagation_seconds")
    assert after["count"] - before["count"] >= 3
    assert after["0.01"] - before["0.01"] == after["count"] - before["count"]
    # bad ages are refused with a clear error and change nothing
    with pytest.raises(ControlError) as e:
        a.client.call("POST", ACK, {"version": 1, "applied": [[1, -5]]})
    assert e.value.status == 400 and "applied" in e.value.message


def test_resume_on_another_replica_gets_only_what_changed(mesh):
    c, admin, agent = mesh
    a, b = agent("alice", "a", 0), agent("bob", "b", 0)
    a.connect(0)
    a.pump(lambda s: b.node_id in s.peers())
    held = a.view.version
    a.close()
    assert admin("PATCH", f"/api/v1/nodes/{b.node_id}", {"name": "renamed"})[0] == 200
    a.kinds.clear()
    a.connect(2)  # another replica, with the version held
    a.pump(lambda s: s.view.netmap.peers[b.node_id].name == "renamed")
    assert a.kinds[0] == "delta" and a.view.version > held
    # a version from the future (ahead of every replica) is refused, never answered with older state
    with pytest.raises(ControlError) as e:
        MapStream(c.replicas[1].api_url, a.key, a.view.version + 10_000)
    assert e.value.status == 503 and e.value.code == "not_ready"


def test_revocation_closes_the_stream_and_removes_the_node_from_peers(mesh):
    c, admin, agent = mesh
    a, b = agent("alice", "a", 0), agent("bob", "b", 1)
    a.connect()
    b.connect()
    a.pump(lambda s: b.node_id in s.peers())
    b.pump(lambda s: a.node_id in s.peers())
    assert admin("DELETE", f"/api/v1/nodes/{b.node_id}")[0] == 200
    a.pump(lambda s: b.node_id not in s.peers())
    b.pump(lambda s: "bye" in s.kinds)
    assert b.bye["code"] == "revoked"
    b.pump(lambda s: s.kinds[-1] == "eof")
    with pytest.raises(ControlError) as e:
        b.connect(2)
    assert e.value.status == 404
    # expiry: the stream closes with a bye, and a new stream is refused with node_expired
    b2 = agent("bob", "b2", 2)
    b2.connect()
    b2.pump(lambda s: a.node_id in s.peers())
    assert admin("POST", f"/api/v1/nodes/{b2.node_id}/expire")[0] == 200
    b2.pump(lambda s: "bye" in s.kinds)
    with pytest.raises(ControlError) as e:
        b2.connect(0)
    assert (e.value.status, e.value.code) == (401, "node_expired")
    a.pump(lambda s: b2.node_id not in s.peers())


def test_cluster_key_rotation_keeps_agents_connected(mesh):
    c, admin, agent = mesh
    a, b = agent("alice", "a", 1), agent("bob", "b", 1)
    a.connect()
    a.pump(lambda s: b.node_id in s.peers())
    old_keys = dict(a.view.pinned)
    status, body = admin("POST", "/api/v1/cluster/keys/rotate", {"overlap_seconds": 3600})
    assert status in (200, 201), body
    assert admin("PATCH", f"/api/v1/nodes/{b.node_id}", {"name": "after-rotation"})[0] == 200
    a.pump(lambda s: s.view.netmap.peers[b.node_id].name == "after-rotation")
    assert set(a.view.pinned) > set(old_keys), "the endorsed new key was pinned"
    # a frame signed by an unknown key is refused
    stranger = AgentNetmap(a.node_id, {"other": base64.b64encode(bytes(SigningKey.generate().verify_key)).decode()})
    a.close()
    s = MapStream(c.replicas[0].api_url, a.key, None)
    try:
        item = s.next(timeout=10)
        assert item[0] == "frame"
        # signed for this map request, first of its stream (AgentNetmap.begin_stream)
        assert (item[1]["nonce"], item[1]["seq"]) == (s.nonce, 0)
        with pytest.raises(FrameError):
            stranger.accept(item[1])
    finally:
        s.close()


def _frames(resp, count: int) -> list[dict]:
    reader, got = FrameReader(), []
    while len(got) < count:
        data = resp.read1(65536)
        assert data, "stream ended"
        got += reader.feed(data)
    return got


def test_frames_after_the_first_are_tagged_only_for_an_agent_that_sent_a_stream_key(mesh):
    import urllib.request, urllib.error
    from raftmesh.proto.machine_auth import sign_headers
    c, admin, agent = mesh
    a = agent("alice", "a", 0)
    url = c.replicas[2].api_url + MAP

    def open_map(stream_key: str | None):
        headers = sign_headers(a.key, "GET", MAP, b"", time.time(), secrets.token_hex(8))
        if stream_key is not None:
            headers[HEADER_STREAM_KEY] = stream_key
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10)
    agent_keys = stream_keypair()
    with open_map(agent_keys[0].hex()) as resp:
        first, second = _frames(resp, 2)  # a delta (the agent went online) or a keepalive
    assert first["kind"] == "full" and "sig" in first
    assert first["key_exchange"]["agent"] == agent_keys[0].hex()
    assert "tag" in second and not {"sig", "key_id", "key_exchange"} & second.keys()
    view = AgentNetmap(a.node_id, a.view.pinned)
    view.begin_stream(first["nonce"], agent_keys)
    assert view.accept(first).kind == "full" and view.accept(second).kind == second["kind"]
    with open_map(None) as resp:  # an agent from before stream keys: every frame signed
        frames = _frames(resp, 2)
    assert all("sig" in f and "tag" not in f and "key_exchange" not in f for f in frames)
    # a bad stream key is refused before anything happens, naming the header
    streams = lambda: c.request(c.replicas[2], "GET", "/api/v1/streams")[1]["streams"]
    wait_until(lambda: streams() == [], timeout=10)
    for bad, why in (("xyz", "64 hex digits"), (bytes(31).hex(), "64 hex digits"),
                     (" ".join(["00"] * 32), "64 hex digits"),
                     (bytes(32).hex(), "unusable stream key")):
        with pytest.raises(urllib.error.HTTPError) as e:
            open_map(bad)
        body = json.loads(e.value.read())["error"]
        assert e.value.code == 400 and body["code"] == "bad_request", body
        assert HEADER_STREAM_KEY in body["message"] and why in body["message"], body
    assert streams() == []


def test_acks_tagged_under_the_stream_key_are_accepted_only_by_its_replica(mesh):
    """An ack may carry a tag under a key derived from the stream's, instead of an Ed25519
    signature; only for /machine/ack, the stream that key belongs to, on its replica."""
    import urllib.request, urllib.error
    from raftmesh.proto.machine_auth import HEADER_STREAM, HEADER_STREAM_TAG, b64, tag_headers
    c, admin, agent = mesh
    a = agent("alice", "a", 1)
    a.connect()
    a.pump(lambda s: s.view.netmap is not None)
    auth = a.view.stream_auth
    assert auth is not None and auth[0] == a.stream.nonce
    a.client.current = 1
    ack = lambda **kw: a.client.signed_request("POST", ACK, {"version": a.view.version}, **kw)  # noqa: E731
    assert ack(stream_auth=auth)["streaming_here"] is True
    wait_until(lambda: (admin("GET", f"/api/v1/nodes/{a.node_id}")[1]["node"]["stream"] or {}).get(
        "acked_version") == a.view.version, timeout=10)

    def refused(headers: dict, replica: int = 1, path: str = ACK, data=None) -> str:
        req = urllib.request.Request(c.replicas[replica].api_url + path, data=data or body, method="POST",
                                     headers={**headers, "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 401
        return json.loads(e.value.read())["error"]["message"]
    body = json.dumps({"version": a.view.version}).encode()
    machine = b64(bytes(a.key.verify_key))
    tagged = lambda key=auth[1], stream=auth[0], path=ACK, data=body: tag_headers(  # noqa: E731
        key, stream, machine, "POST", path, data, time.time(), secrets.token_hex(8))
    assert "does not match" in refused(tagged(key=bytes(32)))
    assert "does not match" in refused(dict(tagged(), **{HEADER_STREAM_TAG: "ü" * 24}))
    assert "no stream" in refused(tagged(stream="another-stream"))
    assert "no stream" in refused(tagged(), replica=0)  # the stream is on r2
    report = b'{"endpoints": []}'
    assert "must be signed" in refused(tagged(path=REPORT, data=report),
                                       path=REPORT, data=report)
    assert "missing" in refused({k: v for k, v in tagged().items() if k != HEADER_STREAM})
    once = tagged()
    urllib.request.urlopen(urllib.request.Request(
        c.replicas[1].api_url + ACK, data=body, method="POST",
        headers={**once, "Content-Type": "application/json"}), timeout=10).close()
    assert "replayed" in refused(once)
    a.close()  # the stream ends: its key no longer tags anything
    wait_until(lambda: not c.request(c.replicas[1], "GET", "/api/v1/streams")[1]["streams"], timeout=10)
    assert "no stream" in refused(tagged())


def test_acks_as_datagrams_are_taken_only_with_the_stream_key_on_its_replica(mesh):
    """An ack datagram (protocol version 3) to the port the stream names records the acked
    version like POST /machine/ack and is confirmed; one with a wrong key, for another
    replica's stream or with a body the API would refuse changes nothing and gets no answer."""
    import socket as sockets
    from raftmesh.proto.ack_datagram import decode_confirm, encode_ack
    c, admin, agent = mesh
    a = agent("alice", "a", 1)
    a.connect()
    a.pump(lambda s: s.view.netmap is not None)
    # (a local cluster's replicas answer STUN, and so ack datagrams, on their API port)
    port = lambda r: int(c.replicas[r].api_url.rsplit(":", 1)[1])  # noqa: E731
    assert a.stream.ack_addr == ("127.0.0.1", port(1))
    auth, version = a.view.stream_auth, a.view.version
    udp = sockets.socket(sockets.AF_INET, sockets.SOCK_DGRAM)
    udp.settimeout(0.5)

    def send(data: bytes, replica: int = 1):
        udp.sendto(data, ("127.0.0.1", port(replica)))
        try:
            return decode_confirm(udp.recv(2048))
        except TimeoutError:
            return None
    acked = lambda: (admin("GET", f"/api/v1/nodes/{a.node_id}")[1]["node"]["stream"] or {}).get(  # noqa: E731
        "acked_version")
    try:
        assert send(encode_ack((auth[0], bytes(32)), {"version": version})) is None
        assert send(encode_ack(auth, {"version": version}), replica=0) is None
        assert send(encode_ack(auth, {"version": -1})) is None
        assert send(encode_ack(auth, {"version": version, "applied": [[version, -5]]})) is None
        assert send(encode_ack(auth, {"version": version}).replace(b'"version"', b'"versioN"')) is None
        assert acked() is None
        assert send(encode_ack(auth, {"version": version, "applied": [[version, 0.01]]})) == \
            (auth[0], version)
        wait_until(lambda: acked() == version, timeout=10)
        counted = c.request(c.replicas[1], "GET", "/metrics")[1]
        assert 'raftmesh_ack_datagrams_total{outcome="taken"} 1.0' in counted
        assert 'raftmesh_ack_datagrams_total{outcome="dropped"} 4.0' in counted
    finally:
        udp.close()


def test_refusals(mesh):
    c, admin, agent = mesh
    pending = ControlClient([c.replicas[0].api_url], SigningKey.generate())
    node_key = base64.b64encode(bytes(PrivateKey.generate().public_key)).decode()
    pending.call("POST", REGISTER, {"node_key": node_key, "hostname": "p"})
    with pytest.raises(ControlError) as e:
        MapStream(c.replicas[0].api_url, pending.key, None)
    assert (e.value.status, e.value.code) == (403, "pending_approval")
    with pytest.raises(ControlError) as e:
        MapStream(c.replicas[1].api_url, SigningKey.generate(), None)
    assert e.value.status == 404
    import urllib.request, urllib.error
    for query in ("", "?since=-1", "?since=abc", "?since=1&since=2", "?other=1"):
        try:
            urllib.request.urlopen(c.replicas[0].api_url + MAP + query, timeout=5)
            raise AssertionError("unsigned map request accepted")
        except urllib.error.HTTPError as err:
            assert err.code in (400, 401), (query, err.code)


def test_key_expiry_by_the_replicated_clock_closes_streams_without_other_writes(make_cluster):
    c = make_cluster(3, extra_args=["--stream-keepalive", "1", "--node-key-lifetime", "4"])
    admin = lambda m, p, b=None: c.request(c.replicas[0], m, p, b)
    assert admin("POST", "/api/v1/users", {"name": "alice"})[0] == 201
    key = admin("POST", "/api/v1/preauth-keys", {"user": "alice", "reusable": True})[1]["key"]
    assert admin("PUT", "/api/v1/policy", ALLOW_ALL)[0] == 200
    a, b = ProtoAgent(c, key, "a", 1), ProtoAgent(c, key, "b", 2)
    try:
        expiry = admin("GET", f"/api/v1/nodes/{a.node_id}")[1]["node"]["key_expiry"]
        assert expiry is not None
        a.connect()
        a.pump(lambda s: b.node_id in s.peers())
        assert a.view.netmap.self_node.key_expiry == expiry
        # nothing else is written: the leader's clock tick moves the replicated clock
        a.pump(lambda s: "bye" in s.kinds, timeout=15)
        assert a.bye["code"] == "revoked"
        with pytest.raises(ControlError) as e:
            a.connect(0)
        assert e.value.code == "node_expired"
        # re-authentication with a pre-auth key brings the node back
        node_key = base64.b64encode(bytes(PrivateKey.generate().public_key)).decode()
        resp = a.client.call("POST", REGISTER,
                             {"node_key": node_key, "hostname": "a", "auth_key": key})
        assert resp["node"]["id"] == a.node_id and not resp["expired"]
        a.kinds.clear()
        a.connect(0, since=None)
        a.pump(lambda s: s.kinds and s.kinds[0] == "full")
    finally:
        a.close()
        b.close()


def test_replayed_map_request_is_refused(mesh):
    c, admin, agent = mesh
    import urllib.request, urllib.error
    from raftmesh.proto.machine_auth import sign_headers
    a = agent("alice", "a", 0)
    headers = sign_headers(a.key, "GET", MAP, b"", time.time(), "nonce-1234567")
    first = urllib.request.urlopen(urllib.request.Request(
        c.replicas[0].api_url + MAP, headers=headers), timeout=5)
    try:
        assert first.status == 200
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(
                c.replicas[0].api_url + MAP, headers=headers), timeout=5)
        assert e.value.code == 401 and b"replayed" in e.value.read()
        forged = dict(headers, **{HEADER_NONCE: "nonce-7654321"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(
                c.replicas[0].api_url + MAP, headers=forged), timeout=5)
        assert e.value.code == 401 and b"does not match" in e.value.read()
    finally:
        first.close()


def test_admin_netmap_view_matches_what_the_agent_holds_on_every_replica(mesh):
    c, admin, agent = mesh
    a, b = agent("alice", "a", 0), agent("bob", "b", 1)
    a.connect()
    a.pump(lambda s: b.node_id in s.peers())
    views = [c.request(r, "GET", f"/api/v1/nodes/{a.node_id}/netmap")[1] for r in c.replicas]
    top = max(v["version"] for v in views)
    a.pump(lambda s: s.view.version >= top)
    want = a.view.netmap.to_json()
    for v in views:
        got = dict(v["netmap"], version=want["version"])
        assert v["version"] < top or got == want, v["replica"]
    assert c.request(c.replicas[0], "GET", "/api/v1/nodes/nope/netmap")[0] == 404
