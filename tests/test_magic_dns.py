"""MagicDNS answers (agent/magic_dns.py) and the host resolver change (agent/resolv_conf.py),
without sockets: every kind of query and bad packet, decided from a netmap."""
import os

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.reversename
import dns.rrset
import pytest

from raftmesh.agent import resolv_conf
from raftmesh.agent.magic_dns import (MAX_QUERY_BYTES, DnsTable, Forward, Reply, decide,
                                      forwarded_reply)
from raftmesh.cluster import dns_config
from raftmesh.proto.wire import Netmap, Peer

MESH = "100.64.0.9"  # a peer asking


def peer(pid: str, name: str, v4: str, v6: str) -> Peer:
    return Peer(id=pid, name=name, node_key="k" + pid, addresses=(f"{v4}/32", f"{v6}/128"),
                allowed_ips=(f"{v4}/32", f"{v6}/128"))


def netmap(**settings) -> Netmap:
    me = peer("n1", "web", "100.64.0.1", "fd7a:115c:a1e0::1")
    other = peer("n2", "db", "100.64.0.2", "fd7a:115c:a1e0::2")
    return Netmap(7, me, {"n2": other}, (), dns_config.validated(settings))


TABLE = DnsTable.from_netmap(netmap(split={"corp.example": ["10.0.0.53"]}), ["192.0.2.53"])


def ask(name: str, rdtype: str = "A", source: str = MESH, table: DnsTable = TABLE, **kw):
    q = dns.message.make_query(name, rdtype, **kw)
    return q, decide(q.to_wire(), source, table)


def answered(name: str, rdtype: str = "A", **kw) -> dns.message.Message:
    q, d = ask(name, rdtype, **kw)
    assert isinstance(d, Reply), d
    r = dns.message.from_wire(d.wire)
    assert r.id == q.id and r.flags & dns.flags.QR
    return r


def texts(r: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in r.answer for rd in rrset)


def test_mesh_names_answer_a_and_aaaa_authoritatively():
    r = answered("db.mesh.internal.")
    assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA
    assert texts(r) == ["100.64.0.2"]
    assert texts(answered("WEB.Mesh.Internal.", "AAAA")) == ["fd7a:115c:a1e0::1"]
    assert texts(answered("db.mesh.internal.", "MX")) == []  # the name exists: no data


def test_unknown_names_in_the_domain_are_nxdomain_and_reverse_lookups_work():
    assert answered("nope.mesh.internal.").rcode() == dns.rcode.NXDOMAIN
    r = answered(dns.reversename.from_address("100.64.0.2").to_text(), "PTR")
    assert texts(r) == ["db.mesh.internal."]
    r = answered(dns.reversename.from_address("fd7a:115c:a1e0::1").to_text(), "PTR")
    assert texts(r) == ["web.mesh.internal."]
    missing = dns.reversename.from_address("100.64.3.3").to_text()
    assert answered(missing, "PTR").rcode() == dns.rcode.NXDOMAIN


def test_other_names_go_to_split_resolvers_else_upstreams():
    q, d = ask("git.corp.example.")
    assert isinstance(d, Forward) and d.resolvers == ("10.0.0.53",) and d.query.id == q.id
    _, d = ask("example.org.")
    assert isinstance(d, Forward) and d.resolvers == ("192.0.2.53",)
    cluster_ns = DnsTable.from_netmap(netmap(nameservers=["9.9.9.9"]), ["192.0.2.53"])
    _, d = ask("example.org.", table=cluster_ns)
    assert d.resolvers == ("9.9.9.9",)  # the cluster's nameservers win over the host's
    none = DnsTable.from_netmap(netmap(), [])
    assert answered("example.org.", table=none).rcode() == dns.rcode.REFUSED


def test_a_rename_or_domain_change_resolves_from_the_next_netmap():
    nm = netmap(domain="corp.internal")
    nm.peers["n2"] = peer("n2", "database", "100.64.0.2", "fd7a:115c:a1e0::2")
    table = DnsTable.from_netmap(nm, [])
    assert texts(answered("database.corp.internal.", table=table)) == ["100.64.0.2"]
    assert answered("db.corp.internal.", table=table).rcode() == dns.rcode.NXDOMAIN


def test_magic_dns_off_or_no_netmap_only_forwards():
    for table in (DnsTable.from_netmap(netmap(magic_dns=False), ["192.0.2.53"]),
                  DnsTable.from_netmap(None, ["192.0.2.53"])):
        _, d = ask("db.mesh.internal.", table=table)
        assert isinstance(d, Forward) and d.resolvers == ("192.0.2.53",)


@pytest.mark.parametrize("source", ["192.0.2.7", "10.1.2.3", "2001:db8::1", "not an address"])
def test_queries_from_outside_the_mesh_are_dropped(source):
    assert ask("db.mesh.internal.", source=source)[1] is None


@pytest.mark.parametrize("source", ["127.0.0.1", "100.100.100.100", "::1", "fd7a:115c:a1e0::5"])
def test_the_host_and_the_mesh_may_ask(source):
    assert isinstance(ask("db.mesh.internal.", source=source)[1], Reply)


def test_malformed_packets_get_formerr_or_are_dropped():
    q = dns.message.make_query("db.mesh.internal.", "A").to_wire()
    for bad in (q[:-3], q + b"\x00" * 7, q[:12] + b"\xff" * 20):
        d = decide(bad, MESH, TABLE)
        assert isinstance(d, Reply), bad
        r = dns.message.from_wire(d.wire)
        assert r.rcode() == dns.rcode.FORMERR and r.id == int.from_bytes(q[:2], "big")
    assert decide(b"", MESH, TABLE) is None and decide(b"\x01" * 11, MESH, TABLE) is None
    huge = decide(q + b"\x00" * MAX_QUERY_BYTES, MESH, TABLE)
    assert dns.message.from_wire(huge.wire).rcode() == dns.rcode.FORMERR
    response = dns.message.make_response(dns.message.from_wire(q)).to_wire()
    assert decide(response, MESH, TABLE) is None  # never answer an answer (reflection loops)


def test_queries_it_does_not_serve_get_a_proper_error():
    q = dns.message.make_query("db.mesh.internal.", "A")
    q.set_opcode(dns.opcode.NOTIFY)
    assert dns.message.from_wire(decide(q.to_wire(), MESH, TABLE).wire).rcode() == dns.rcode.NOTIMP
    two = dns.message.make_query("db.mesh.internal.", "A")
    two.question.append(dns.message.make_query("web.mesh.internal.", "A").question[0])
    assert dns.message.from_wire(decide(two.to_wire(), MESH, TABLE).wire).rcode() == dns.rcode.FORMERR
    chaos = dns.message.make_query("version.bind.", "TXT", rdclass="CH")
    assert dns.message.from_wire(decide(chaos.to_wire(), MESH, TABLE).wire).rcode() == dns.rcode.REFUSED


def test_forwarded_answers_keep_the_client_id_and_fit_its_size():
    q, d = ask("example.org.")
    upstream = dns.message.make_response(q)
    upstream.id = 999
    for i in range(60):
        upstream.answer.append(dns.rrset.from_text("example.org.", 60, "IN", "TXT", f'"{"x" * 60}{i}"'))
    r = dns.message.from_wire(forwarded_reply(q, upstream, d.max_size))
    assert r.id == q.id and r.flags & dns.flags.TC and not r.answer  # 512 bytes: truncated
    failed = dns.message.from_wire(forwarded_reply(q, None, d.max_size))
    assert failed.rcode() == dns.rcode.SERVFAIL and failed.id == q.id


# -- the host's resolver configuration ----------------------------------------------------------
ORIGINAL = "# from DHCP\nnameserver 192.0.2.53\nnameserver 192.0.2.54\nsearch lan\noptions edns0\n"


def test_resolv_conf_is_changed_in_place_and_restored(tmp_path):
    conf, state = tmp_path / "resolv.conf", tmp_path / "state"
    conf.write_text(ORIGINAL)
    state.mkdir()
    inode = os.stat(conf).st_ino
    hr = resolv_conf.HostResolver(str(state), "wg0", str(conf))
    hr.point_at_mesh("mesh.internal")
    text = conf.read_text()
    assert "nameserver 100.100.100.100" in text and "search mesh.internal lan" in text
    assert "options edns0" in text and "192.0.2.53" not in text
    assert os.stat(conf).st_ino == inode  # in place: a bind-mounted file stays mounted
    assert hr.upstreams() == ["192.0.2.53", "192.0.2.54"]  # the originals, not ourselves
    # a crash leaves the backup: the next run still finds the original resolvers, and a
    # logout without a running daemon restores the file
    again = resolv_conf.HostResolver(str(state), "wg0", str(conf))
    assert again.upstreams() == ["192.0.2.53", "192.0.2.54"]
    again.point_at_mesh("corp.internal")
    assert "search corp.internal lan" in conf.read_text()
    resolv_conf.HostResolver(str(state), "wg0", str(conf)).restore()
    assert conf.read_text() == ORIGINAL and not list(state.iterdir())


def test_with_systemd_resolved_only_the_interface_gets_the_domains(tmp_path, monkeypatch):
    calls = []
    hr = resolv_conf.HostResolver(str(tmp_path), "wg0", str(tmp_path / "resolv.conf"),
                                  run=lambda argv, check: calls.append(argv))
    monkeypatch.setattr(hr, "resolved_manages", lambda: True)
    hr.point_at_mesh("mesh.internal", ["corp.example"])
    hr.restore()
    assert calls == [["resolvectl", "dns", "wg0", "100.100.100.100"],
                     ["resolvectl", "domain", "wg0", "mesh.internal", "~corp.example"],
                     ["resolvectl", "revert", "wg0"]]
    assert not (tmp_path / "resolv.conf").exists()  # the file was never touched
