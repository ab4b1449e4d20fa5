"""Endpoint discovery and probing without a network: the STUN codec's bounds, the replica's
STUN responder, probe sealing and the path decisions (agent/disco.py), the raw-socket
framing (agent/paths.py)."""
import asyncio
import base64
import os
import socket

import pytest
from nacl.public import PrivateKey
from prometheus_client import CollectorRegistry
from waiting import wait_until

from raftmesh.agent import disco, paths
from raftmesh.api import stun_server
from raftmesh.proto import stun


def test_binding_request_answer_and_mapped_address_round_trip():
    txid = stun.new_transaction_id()
    answer = stun.answer(stun.binding_request(txid), ("198.51.100.7", 40000))
    assert len(answer) <= stun.MAX_ANSWER_BYTES
    assert stun.mapped_address(answer, txid) == "198.51.100.7:40000"
    with pytest.raises(stun.StunError, match="another transaction"):
        stun.mapped_address(answer, stun.new_transaction_id())
    ipv6 = stun.answer(stun.binding_request(txid), ("2001:db8::1", 5))
    assert len(ipv6) <= stun.MAX_ANSWER_BYTES and stun.mapped_address(ipv6, txid) == "[2001:db8::1]:5"


@pytest.mark.parametrize("packet, problem", [
    (b"", "magic cookie"),
    (b"\x00\x01\x00\x00" + b"\x00" * 16, "magic cookie"),
    (stun.binding_request(b"x" * 12)[:-1] + b"\x00\x00\x00\x04", "malformed"),
    (stun.binding_request(b"x" * 12) + b"\x00" * 600, "more than 548"),
    (stun.answer(stun.binding_request(b"x" * 12), ("192.0.2.1", 1)), "not a binding request"),
])
def test_replica_refuses_what_is_not_a_bounded_binding_request(packet, problem):
    with pytest.raises(stun.StunError, match=problem):
        stun.answer(packet, ("192.0.2.1", 1))


def test_replica_stun_responder_answers_requests_and_drops_the_rest():
    async def scenario():
        registry = CollectorRegistry()
        transport = await stun_server.start("127.0.0.1", 0, registry, lambda data: None)
        port = transport.get_extra_info("sockname")[1]
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.bind(("127.0.0.1", 0))
        client.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            client.sendto(b"\x00" * 700, ("127.0.0.1", port))  # dropped: no answer comes
            txid = stun.new_transaction_id()
            client.sendto(stun.binding_request(txid), ("127.0.0.1", port))
            data = await asyncio.wait_for(loop.sock_recv(client, 2048), 5)
            assert stun.mapped_address(data, txid) == f"127.0.0.1:{client.getsockname()[1]}"
            counted = {s.labels["outcome"]: s.value for m in registry.collect() for s in m.samples
                       if s.name == "raftmesh_stun_packets_total"}
            assert counted == {"dropped": 1.0, "answered": 1.0}
        finally:
            client.close()
            transport.close()
    asyncio.run(scenario())


def _keys():
    k = PrivateKey.generate()
    return bytes(k), bytes(k.public_key)


def test_probe_opens_only_with_the_peer_keys_it_was_sealed_for():
    (a_priv, a_pub), (b_priv, b_pub), (c_priv, _) = _keys(), _keys(), _keys()
    sealed = disco.seal(disco.Probe(disco.PONG, b"t" * 12, "198.51.100.1:41641"), a_priv, a_pub, b_pub)
    assert disco.sender_of(sealed) == a_pub
    assert disco.open_probe(sealed, b_priv, a_pub) == disco.Probe(disco.PONG, b"t" * 12,
                                                                 "198.51.100.1:41641")
    with pytest.raises(disco.ProbeError, match="authenticate"):
        disco.open_probe(sealed, c_priv, a_pub)  # an outsider cannot read or forge it
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(disco.ProbeError, match="authenticate"):
        disco.open_probe(tampered, b_priv, a_pub)
    for junk in (b"", b"RMd1" + os.urandom(40), b"xxxx" + sealed[4:], sealed + b"\0" * 300):
        with pytest.raises(disco.ProbeError, match="not a probe"):
            disco.sender_of(junk)


class Txids:
    def __init__(self):
        self.n = 0

    def __call__(self) -> bytes:
        self.n += 1
        return self.n.to_bytes(12, "big")


def test_search_pings_every_candidate_until_one_answers_then_only_the_path():
    f, txids = disco.PathFinder(), Txids()
    f.set_peers({"B": ("10.0.0.2:41641", "198.51.100.2:41641")}, now=0.0)
    pings = f.due(0.0, txids)
    assert [(k, c) for k, c, _ in pings] == [("B", "10.0.0.2:41641"), ("B", "198.51.100.2:41641")]
    assert f.due(0.1, txids) == []  # not before BURST_INTERVAL
    again = f.due(disco.BURST_INTERVAL, txids)
    assert len(again) == 2
    public_tx = again[1][2]
    assert f.pong("B", public_tx, "198.51.100.9:41641", 0.3) is None  # from elsewhere: no path
    assert f.pong("B", b"?" * 12, "198.51.100.2:41641", 0.3) is None  # unknown transaction
    assert f.pong("B", public_tx, "198.51.100.2:41641", 0.3) == "198.51.100.2:41641"
    assert f.direct() == {"B": "198.51.100.2:41641"}
    beats = f.due(0.3 + disco.HEARTBEAT, txids)
    assert [c for _, c, _ in beats] == ["198.51.100.2:41641"]


def test_a_path_that_stops_answering_is_dropped_and_searched_again():
    f, txids = disco.PathFinder(), Txids()
    f.set_peers({"B": ("198.51.100.2:41641",)}, now=0.0)
    (_, cand, tx), = f.due(0.0, txids)
    assert f.pong("B", tx, cand, 0.1) == cand
    t = 0.1
    while t < 0.1 + disco.PATH_TIMEOUT:  # heartbeats go unanswered
        t += disco.HEARTBEAT
        f.due(t, txids)
    assert f.direct() == {} and f.lost
    (_, _, tx), = f.due(t + disco.BURST_INTERVAL, txids)
    assert f.pong("B", tx, cand, t + 0.3) == cand  # found again, reported again


def test_new_candidates_restart_the_search_and_keep_a_path_still_listed():
    f, txids = disco.PathFinder(), Txids()
    f.set_peers({"B": ("198.51.100.2:41641",)}, now=0.0)
    (_, cand, tx), = f.due(0.0, txids)
    f.pong("B", tx, cand, 0.1)
    f.set_peers({"B": ("10.0.0.2:41641", "198.51.100.2:41641")}, now=1.0)
    assert f.direct() == {"B": cand}
    f.set_peers({"B": ("198.51.100.3:41641",)}, now=2.0)  # the peer's NAT rebound
    assert f.direct() == {}
    assert [c for _, c, _ in f.due(2.0, txids)] == ["198.51.100.3:41641"]
    f.set_peers({}, now=3.0)
    assert f.peers == {} and f.due(3.0, txids) == []


def test_search_slows_down_after_the_burst():
    f, txids = disco.PathFinder(), Txids()
    f.set_peers({"B": ("198.51.100.2:41641",)}, now=0.0)
    f.due(disco.BURST_LENGTH + 0.1, txids)
    assert f.next_wakeup(disco.BURST_LENGTH + 0.1) == pytest.approx(disco.BURST_LENGTH + 0.1 + disco.SLOW_INTERVAL)
    f.search("B", disco.BURST_LENGTH + 0.5)  # the peer pinged us: burst again now
    assert f.next_wakeup(disco.BURST_LENGTH + 0.5) == disco.BURST_LENGTH + 0.5


def test_udp_framing_and_endpoint_parsing():
    dgram = paths.udp_datagram(41641, 3478, b"payload")
    ip_header = bytes([0x45]) + b"\0" * 11 + socket.inet_aton("198.51.100.4") + b"\0" * 4
    assert paths.parse_ipv4_udp(ip_header + dgram) == ("198.51.100.4", 41641, b"payload")
    assert paths.parse_ipv4_udp(ip_header + dgram[:5]) is None
    assert paths.split_endpoint("198.51.100.4:41641") == ("198.51.100.4", 41641)
    assert paths.split_endpoint("[2001:db8::1]:41641") is None
    assert paths.split_endpoint("host.example:1") is None
    assert len(paths._bpf_program(41641)) == 9 * 8


def test_candidates_told_over_the_relay_are_searched_at_once_until_the_netmap_changes():
    """A peer's sealed CANDIDATES (its new STUN mapping, before a netmap delta brings it) are
    pinged at once beside the netmap's; no news changes nothing, nor does anything once a
    path is held; the next netmap change for the peer replaces them."""
    (a_priv, a_pub), (b_priv, b_pub) = _keys(), _keys()
    told = disco.Probe(disco.CANDIDATES, b"t" * 12, "198.51.100.2:41641,10.0.0.2:41641")
    assert disco.open_probe(disco.seal(told, a_priv, a_pub, b_pub), b_priv, a_pub) == told
    f, txids = disco.PathFinder(), Txids()
    f.set_peers({"B": ("10.0.0.2:41641",)}, now=0.0)
    f.due(0.0, txids)
    assert f.due(0.05, txids) == []
    f.told("B", ("198.51.100.2:41641", "10.0.0.2:41641"), now=0.05)
    pings = f.due(0.05, txids)
    assert [c for _, c, _ in pings] == ["10.0.0.2:41641", "198.51.100.2:41641"]
    f.told("B", ("198.51.100.2:41641",), now=0.1)  # no news: the search goes on at its pace
    assert f.due(0.1, txids) == []
    assert f.pong("B", pings[1][2], "198.51.100.2:41641", 0.1) == "198.51.100.2:41641"
    f.told("B", ("198.51.100.7:41641",), now=0.2)  # a path is held: ignored
    assert [c for _, c, _ in f.due(0.1 + disco.HEARTBEAT, txids)] == ["198.51.100.2:41641"]
    f.set_peers({"B": ("198.51.100.3:41641",)}, now=2.0)
    assert f.peers["B"].told == () and [c for _, c, _ in f.due(2.0, txids)] == ["198.51.100.3:41641"]
    f.told("Z", ("198.51.100.9:41641",), now=2.0)  # not a peer: nothing
    assert set(f.peers) == {"B"}


@pytest.mark.skipif(os.geteuid() != 0, reason="the prober's raw socket needs root")
def test_being_told_by_a_peer_is_reported_once_per_message_and_never_for_strangers():
    """Told candidates also mean the peer has us in its WireGuard now: the prober's thread
    reports that (`peer_told`), which lets the daemon resend an initiation that went before
    (WireGuardInterface.retry_unanswered). A stranger's message, or one sealed by another
    key than the relayed sender's, reports nothing."""
    (a_priv, a_pub), (b_priv, b_pub), (z_priv, z_pub) = _keys(), _keys(), _keys()
    reported = []
    prober = paths.PathProber(0, lambda: (a_priv, a_pub), lambda k, e: None, lambda m: None,
                              lambda k: None, lambda k, m: None, peer_told=reported.append)
    b_key = base64.b64encode(b_pub).decode()
    prober.start()
    try:
        assert prober.set_peers({b_key: ()}) == [b_key]
        assert prober.set_peers({b_key: ()}) == []  # not new any more
        told = disco.Probe(disco.CANDIDATES, b"t" * 12, "198.51.100.2:41641")
        prober.told(z_pub, disco.seal(told, z_priv, z_pub, a_pub))  # not a peer
        prober.told(b_pub, disco.seal(told, z_priv, z_pub, a_pub))  # sealed by someone else
        prober.told(b_pub, disco.seal(told, b_priv, b_pub, a_pub))
        wait_until(lambda: reported, 5, what="the peer's message reported")
        assert reported == [b_key]
    finally:
        prober.close()
