"""Relay links between replicas (api/relay_links.py): agents whose relay sessions are on
different replicas reach each other, a link that cannot prove the cluster secret is refused,
and a killed replica's sessions move while traffic still flows."""
from __future__ import annotations

import asyncio
import os

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from relay_machine import Machine
from waiting import wait_until

from raftmesh.api.relay import RelayHub
from raftmesh.api.relay_link_wire import (DOWN, FRAME, MAX_KEYS_PER_RECORD, UP, LinkCipher, LinkError,
                                          announcements, check_proof, proof, record, records)
from raftmesh.api.relay_links import HEADER_FROM, HEADER_NONCE, LINK_PATH


def test_sealed_link_messages_cannot_be_altered_replayed_or_injected():
    key, dn, an = os.urandom(32), os.urandom(16), os.urandom(16)
    dialer, acceptor = LinkCipher(key, dn, an, dialing=True), LinkCipher(key, dn, an, dialing=False)
    first, second = dialer.seal(b"one"), dialer.seal(b"two")
    assert acceptor.open(first) == b"one"
    with pytest.raises(LinkError, match="failed authentication"):
        acceptor.open(first)  # replayed
    with pytest.raises(LinkError, match="failed authentication"):
        acceptor.open(second[:-1] + bytes([second[-1] ^ 1]))  # altered
    forged = LinkCipher(os.urandom(32), dn, an, dialing=True)
    forged._sent = 1
    with pytest.raises(LinkError, match="failed authentication"):
        acceptor.open(forged.seal(b"two"))  # sealed without the cluster's key
    assert acceptor.open(second) == b"two"
    assert dialer.open(acceptor.seal(b"back")) == b"back"  # each direction its own key
    args = (key, "acceptor", "10.0.0.1:7000", "10.0.0.2:7000", dn, an)
    check_proof(proof(*args), *args)
    with pytest.raises(LinkError, match="proof does not match"):
        check_proof(proof(*args), key, "dialer", *args[2:])  # not the other role's proof


def test_link_records_are_bounded_and_checked():
    keys = [bytes([i % 256]) * 32 for i in range(MAX_KEYS_PER_RECORD + 1)]
    ups = announcements(UP, keys)
    assert [len(body) // 32 for _, body in records(b"".join(ups))] == [MAX_KEYS_PER_RECORD, 1]
    for bad, why in ((record(UP, b"x" * 33), "announcement of 33 bytes"),
                     (record(DOWN, bytes(32 * (MAX_KEYS_PER_RECORD + 1))), "not 1 to"),
                     (record(FRAME, bytes(64)), "frame record of 64 bytes"),
                     (record(9, b""), "unknown record kind"), (record(UP, bytes(32))[:-1], "overruns"),
                     (b"\x01\x00", "inside a record's header")):
        with pytest.raises(LinkError, match=why):
            records(bad)


class _FakeLink:
    def __init__(self):
        self.sent = []


def test_route_frame_sends_to_a_local_session_first_then_over_the_link():
    hub = RelayHub(CollectorRegistry())
    me, here, there = b"a" * 32, b"b" * 32, b"c" * 32
    link = _FakeLink()
    hub.sessions[here] = "session"
    hub.remote[here] = hub.remote[there] = link
    assert hub.route_frame(me, here + b"pkt") == ("session", me + b"pkt")
    assert hub.route_frame(me, there + b"pkt") == (link, there + me + b"pkt")
    assert hub.route_frame(there, there + b"pkt")[0] is None


def _metrics(cluster, replica) -> dict[str, float]:
    status, text = cluster.request(replica, "GET", "/metrics")
    assert status == 200
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("raftmesh_relay")}


def _exchange(a: Machine, b: Machine) -> None:
    for src, dst, packet in ((a, b, b"\x01initiation"), (b, a, b"\x02response")):
        got = []

        def arrived():
            src.send_to(dst, packet)  # the first may leave before the peer's session is announced
            try:
                dst.wg.settimeout(0.3)
                got.append(dst.wg.recvfrom(4096)[0])
            except OSError:
                return False
            return True
        wait_until(arrived, 10, what=f"a packet from {src.node_key[:6]} through the relays")
        assert got[-1] == packet


def _link(url: str, headers: dict, secret_proof: bytes | None) -> tuple[int, str]:
    """Dial a replica's link route as a stranger would: (HTTP status or 101, how it ended)."""
    async def attempt():
        async with aiohttp.ClientSession() as http:
            try:
                async with http.ws_connect(url + LINK_PATH, headers=headers) as ws:
                    await ws.receive(timeout=5)  # the replica's nonce and proof
                    await ws.send_bytes(secret_proof)
                    msg = await ws.receive(timeout=5)
                    return 101, msg.type.name
            except aiohttp.WSServerHandshakeError as e:
                return e.status, e.message
    return asyncio.run(attempt())


def test_agents_on_different_replicas_reach_each_other_and_strangers_cannot_link(make_cluster):
    c = make_cluster(3)
    r1, r2, r3 = sorted(c.replicas, key=lambda r: r.api_url)
    assert c.request(r1, "POST", "/api/v1/users", {"name": "u"})[0] == 201
    key = c.request(r1, "POST", "/api/v1/preauth-keys", {"user": "u", "reusable": True})[1]["key"]
    wait_until(lambda: all(_metrics(c, r).get("raftmesh_relay_links") == 2.0 for r in c.replicas), 20,
               what="a link between every pair of replicas")
    a = Machine(r1.api_url, key, "a", relay_urls=[r1.api_url, r3.api_url])  # r1 first, then r3
    b = Machine(r1.api_url, key, "b", relay_urls=[r2.api_url])
    try:
        for m in (a, b):
            m.relay.start()
        wait_until(lambda: a.relay.server == r1.api_url and b.relay.server == r2.api_url, 20,
                   what="relay sessions on r1 and r2")
        _exchange(a, b)
        assert _metrics(c, r1)['raftmesh_relay_frames_total{outcome="forwarded"}'] >= 1
        assert _metrics(c, r2)['raftmesh_relay_link_frames_total{outcome="delivered"}'] >= 1

        member = r1.raft_addr  # a real member's address, but no knowledge of the secret
        status, _ = _link(r2.api_url, {HEADER_FROM: "10.9.9.9:1", HEADER_NONCE: os.urandom(16).hex()}, b"")
        assert status == 403
        refused = _metrics(c, r2)["raftmesh_relay_links_refused_total"]
        assert _link(r2.api_url, {HEADER_FROM: member, HEADER_NONCE: os.urandom(16).hex()},
                     os.urandom(32)) == (101, "CLOSE")
        assert _metrics(c, r2)["raftmesh_relay_links_refused_total"] == refused + 1
        assert _metrics(c, r2)["raftmesh_relay_links"] == 2.0  # the real links are untouched

        c.kill(r1)  # a's session moves to r3, b's stays on r2: r3 forwards to r2
        wait_until(lambda: a.relay.server == r3.api_url, 10, what="a's session moved to r3")
        _exchange(a, b)
        assert _metrics(c, r3)['raftmesh_relay_frames_total{outcome="forwarded"}'] >= 1
    finally:
        for m in (a, b):
            m.close()
