"""The agent's resolver over real sockets (agent/dns_server.py), on loopback addresses: UDP
and TCP, a large forwarded answer truncated over UDP and whole over TCP, and bad clients
that change nothing for the next one."""
from __future__ import annotations

import socket
import threading

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rrset
import pytest

from raftmesh.agent.dns_server import DnsServer
from raftmesh.agent.magic_dns import DnsTable
from raftmesh.lab.local_cluster import free_ports

from test_magic_dns import netmap

SERVER, UPSTREAM = "127.0.53.1", "127.0.53.2"  # the upstream must be on port 53
BIG = [f'"{"x" * 200}{i}"' for i in range(20)]  # ~4 KB of TXT: more than UDP carries


class FakeUpstream:
    """Answers every query, UDP or TCP, with BIG as TXT records."""

    def __init__(self):
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of the last test
        try:
            self.udp.bind((UPSTREAM, 53))
            self.tcp.bind((UPSTREAM, 53))
        except OSError as e:
            self.close()
            pytest.skip(f"cannot bind {UPSTREAM}:53 ({e})")
        self.tcp.listen(4)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._udp, daemon=True),
                        threading.Thread(target=self._tcp, daemon=True)]
        for t in self.threads:
            t.start()

    @staticmethod
    def answer(wire: bytes) -> dns.message.Message:
        q = dns.message.from_wire(wire)
        r = dns.message.make_response(q)
        r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "TXT", *BIG))
        return r

    def _udp(self):
        self.udp.settimeout(0.2)
        while not self.stop.is_set():
            try:
                data, client = self.udp.recvfrom(4096)
            except OSError:
                continue
            self.udp.sendto(_truncated(self.answer(data)), client)  # too large for UDP

    def _tcp(self):
        self.tcp.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                query, _ = dns.query.receive_tcp(conn)
                dns.query.send_tcp(conn, self.answer(query.to_wire()))

    def close(self):
        if hasattr(self, "stop"):
            self.stop.set()
            for t in self.threads:
                t.join(timeout=2)
        self.udp.close()
        self.tcp.close()


def _truncated(r: dns.message.Message) -> bytes:
    r.answer.clear()
    r.flags |= dns.flags.TC
    return r.to_wire()


@pytest.fixture
def server():
    port = free_ports(1, SERVER)[0]
    upstream = FakeUpstream()
    srv = DnsServer(SERVER, port)
    srv.table = DnsTable.from_netmap(netmap(), [UPSTREAM])
    srv.start()
    try:
        yield srv, port
    finally:
        srv.close()
        upstream.close()


def test_mesh_names_over_udp_and_tcp(server):
    _, port = server
    q = dns.message.make_query("db.mesh.internal.", "A")
    for ask in (dns.query.udp, dns.query.tcp):
        r = ask(q, SERVER, port=port, timeout=5)
        assert r.rcode() == dns.rcode.NOERROR and [rd.to_text() for rd in r.answer[0]] == ["100.64.0.2"]


def test_a_large_forwarded_answer_comes_whole_over_tcp(server):
    _, port = server
    q = dns.message.make_query("big.example.", "TXT")
    r = dns.query.udp(q, SERVER, port=port, timeout=5)
    assert r.flags & dns.flags.TC and not r.answer
    r = dns.query.tcp(q, SERVER, port=port, timeout=5)
    assert r.id == q.id and sorted(rd.to_text() for rd in r.answer[0]) == sorted(BIG)


def test_bad_clients_leave_the_resolver_serving(server):
    _, port = server
    with socket.create_connection((SERVER, port), timeout=5) as c:
        c.sendall(b"\x00\x05hello")  # a message that is no DNS: FORMERR needs 12 bytes, so closed
        assert c.recv(100) == b""
    with socket.create_connection((SERVER, port), timeout=5) as c:
        c.sendall(b"\x00\x40abc")  # a length it never completes; the next client is served
        q = dns.message.make_query("web.mesh.internal.", "A")
        assert dns.query.tcp(q, SERVER, port=port, timeout=5).answer
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.sendto(b"\xff" * 9000, (SERVER, port))  # huge: FORMERR, or nothing
    q = dns.message.make_query("web.mesh.internal.", "A")
    assert dns.query.udp(q, SERVER, port=port, timeout=5).answer
