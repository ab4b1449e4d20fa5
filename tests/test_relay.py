"""The relay without namespaces: agents' RelayClients on one in-memory replica, UDP sockets on
127.0.0.1 standing in for wireguard-go; refusals of unauthenticated sessions and bad frames."""
from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request

import aiohttp
import pytest
from in_memory_api import ServedInMemory
from nacl.signing import SigningKey
from relay_machine import Machine
from waiting import wait_until

from raftmesh.agent.disco import MAGIC
from raftmesh.agent.relay import REASSERT_DELAY
from raftmesh.api.relay import RelayHub
from raftmesh.proto.machine_auth import sign_headers
from raftmesh.proto.relay import MAX_BATCH_BYTES, MAX_FRAME_BYTES, RelayFrameError, frames, packets
from raftmesh.proto.routes import RELAY
from prometheus_client import CollectorRegistry


def admin(api, method: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(api.replicas[0].api_url + path, json.dumps(body).encode(), method=method,
                                 headers={"Authorization": f"Bearer {api.admin_key}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    with ServedInMemory(str(tmp_path_factory.mktemp("relay"))) as api:
        admin(api, "POST", "/api/v1/users", {"name": "u"})
        key = admin(api, "POST", "/api/v1/preauth-keys", {"user": "u", "reusable": True})["key"]
        machines = [Machine(api.replicas[0].api_url, key, n) for n in ("m1", "m2")]
        try:
            for m in machines:
                m.relay.start()
            wait_until(lambda: all(m.relay.server for m in machines), 10, what="relay sessions up")
            yield api, machines
        finally:
            for m in machines:
                m.close()


def test_wireguard_packets_pass_between_two_agents_through_the_relay(mesh):
    _, (m1, m2) = mesh
    to_m2 = m1.relay.endpoint_for(m2.node_key)  # WireGuard's endpoint for m2 on m1
    m1.wg.sendto(b"\x01handshake", ("127.0.0.1", int(to_m2.rsplit(":", 1)[1])))
    data, source = m2.wg.recvfrom(4096)
    assert data == b"\x01handshake"
    assert f"{source[0]}:{source[1]}" == m2.relay.endpoint_for(m1.node_key)  # m1 seen at one place
    m2.wg.sendto(b"\x02response", source)
    data, source = m1.wg.recvfrom(4096)
    assert data == b"\x02response" and f"127.0.0.1:{source[1]}" == to_m2


def test_a_burst_of_packets_crosses_the_relay_in_few_frames(mesh):
    """Packets that pile up while the session writes go out together (proto/relay.py): the
    replica sees fewer frames than packets, and every packet arrives, in order."""
    api, (m1, m2) = mesh
    to_m2 = ("127.0.0.1", int(m1.relay.endpoint_for(m2.node_key).rsplit(":", 1)[1]))
    before = _relay_metrics(api).get("relayed", 0.0)
    m2.wg.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # holds the whole burst
    sent = [i.to_bytes(2, "big") * 100 for i in range(200)]
    for packet in sent:
        m1.wg.sendto(packet, to_m2)
    got = [m2.wg.recvfrom(4096)[0] for _ in sent]
    assert got == sent
    assert _relay_metrics(api)["relayed"] - before < len(sent) / 2


def test_batches_split_into_bounded_frames_and_bad_batches_are_refused():
    key = b"k" * 32
    sent = [bytes([i]) * 1400 for i in range(100)]
    out = frames(key, sent)
    assert len(out) == 3 and all(len(f) <= MAX_FRAME_BYTES and f[:32] == key for f in out)
    assert [bytes(p) for f in out for p in packets(f[32:])] == sent
    for bad, why in ((b"\x00", "inside a packet's length"), (b"\x00\x05abc", "packet of 5 bytes"),
                     (b"\x00\x00", "packet of 0 bytes"), (b"\x09\x00" + bytes(2304), "packet of 2304 bytes")):
        with pytest.raises(RelayFrameError, match=why):
            packets(bad)
    assert MAX_BATCH_BYTES == MAX_FRAME_BYTES - 32


def _relay_metrics(api) -> dict[str, float]:
    with urllib.request.urlopen(api.replicas[0].api_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
            if line.startswith("raftmesh_relay_frames_total{")}


def _signed(key: SigningKey) -> dict:
    return sign_headers(key, "GET", RELAY, b"", time.time(), "n" + str(time.monotonic_ns()))


def test_sessions_without_a_machine_key_proof_are_refused(mesh):
    api, _ = mesh
    url = api.replicas[0].api_url + RELAY

    async def attempt(headers):
        async with aiohttp.ClientSession() as http:
            try:
                async with http.ws_connect(url, headers=headers):
                    return 101, ""
            except aiohttp.WSServerHandshakeError as e:
                return e.status, e.message
    assert asyncio.run(attempt({}))[0] == 401
    assert asyncio.run(attempt(_signed(SigningKey.generate())))[0] == 404  # not in the mesh


def test_frames_to_unknown_peers_and_oversized_frames_are_dropped(mesh):
    api, _ = mesh
    key = admin(api, "POST", "/api/v1/preauth-keys", {"user": "u"})["key"]
    m3 = Machine(api.replicas[0].api_url, key, "m3")  # its own session: one under m1's key would replace m1's
    m3.close()
    before = _relay_metrics(api).get("dropped", 0.0)

    async def scenario():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(api.replicas[0].api_url + RELAY, headers=_signed(m3.key)) as ws:
                await ws.send_bytes(bytes(32) + b"to nobody")
                await ws.send_bytes(b"short")
                await ws.send_str("text is not a frame")
                await ws.send_bytes(bytes(MAX_FRAME_BYTES + 1))  # the server closes the session
                msg = await ws.receive(timeout=5)
                return msg.type
    assert asyncio.run(scenario()) in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    wait_until(lambda: _relay_metrics(api).get("dropped", 0.0) >= before + 2, 5, what="drops counted")
    assert _relay_metrics(api).get("refused", 0.0) >= 1
    with urllib.request.urlopen(api.replicas[0].api_url + "/metrics", timeout=10) as resp:
        assert "raftmesh_relay_sessions 2.0" in resp.read().decode()  # m1 and m2's sessions


def test_route_frame_names_why_a_frame_is_dropped():
    hub = RelayHub(CollectorRegistry())
    me, peer = b"a" * 32, b"b" * 32
    hub.sessions[peer] = "session"
    assert hub.route_frame(me, peer + b"pkt") == ("session", me + b"pkt")
    assert hub.route_frame(me, b"c" * 32 + b"pkt") == (None, "destination not connected to this relay")
    assert hub.route_frame(peer, peer + b"pkt")[0] is None  # never back to the sender
    assert hub.route_frame(me, peer) == (None, "frame without a packet")
    assert "more than" in hub.route_frame(me, peer + bytes(MAX_FRAME_BYTES))[1]


def test_sealed_candidates_cross_the_relay_to_the_agent_not_to_wireguard(mesh):
    """A packet that starts like a probe (agent/disco.py MAGIC: a peer's sealed candidates)
    is handed to the agent's `told`, never to wireguard-go; WireGuard packets still are."""
    _, (m1, m2) = mesh
    got = []
    m2.relay.told = lambda sender, message: got.append((sender, message))
    try:
        m1.relay.send(m2.wg_public, MAGIC + b"sealed candidates")
        wait_until(lambda: got, 5, what="the candidates handed to the agent")
        assert got == [(m1.wg_public, MAGIC + b"sealed candidates")]
        m1.send_to(m2, b"\x01after")
        assert m2.wg.recvfrom(4096)[0] == b"\x01after"  # and nothing before it
    finally:
        m2.relay.told = lambda sender, message: None


def test_relayed_packets_let_the_agent_reassert_a_direct_path_once_per_burst(mesh):
    """WireGuard moves a peer to wherever its last packet came from: after packets arrive
    relayed, `relayed` names their sender once per burst (the daemon then puts back a proven
    direct path, agent/daemon.py), not once per packet."""
    _, (m1, m2) = mesh
    calls = []
    m2.relay.relayed = calls.append
    try:
        for i in range(5):
            m1.send_to(m2, b"\x04burst" + bytes([i]))
        for _ in range(5):
            m2.wg.recvfrom(4096)
        wait_until(lambda: calls, 5, what="the relayed callback")
        time.sleep(REASSERT_DELAY * 2)  # no second call may follow for the same burst
        assert calls == [m1.wg_public]
    finally:
        m2.relay.relayed = lambda key: None
