"""MagicDNS and node lifecycle end to end: three replica processes, real agents
(wireguard-go) in network namespaces, queried with dnspython from inside the namespaces.

Names resolve through the namespace's own resolv.conf (pointed at 100.100.100.100 and
restored when the agent stops), cluster DNS changes and a rename resolve after netmap
propagation, other names are forwarded to the host's resolver or a split-DNS resolver, bad
packets get errors without harming the agent, names keep resolving with every replica
stopped (and after an agent restart then), and an ephemeral node offline past the cluster's
limit is removed by the cluster and stops resolving."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from contextlib import closing

import pytest
from netns import AgentsLab, wait_for

from raftmesh.bench import harness

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not all(shutil.which(t) for t in ("wireguard-go", "wg", "nft")),
                       reason="needs root, wireguard-go, wg and nft"),
    pytest.mark.timeout(300),
]

UPSTREAM, SPLIT = "192.0.2.53", "192.0.2.54"  # two addresses of one fake resolver
ORIGINAL_RESOLV_CONF = f"# the lab host's resolver\nnameserver {UPSTREAM}\nsearch lab\n"

# Answers every A query with the address the query arrived at: which resolver was asked.
FAKE_RESOLVER = r"""
import select, socket, sys
import dns.message, dns.rrset
socks = []
for addr in sys.argv[1:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, 53))
    socks.append(s)
print("listening", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        data, client = s.recvfrom(4096)
        q = dns.message.from_wire(data)
        r = dns.message.make_response(q)
        r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", s.getsockname()[0]))
        s.sendto(r.to_wire(), client)
"""

# One query to 100.100.100.100 (or the system resolver with `system`): prints JSON.
QUERY = r"""
import json, socket, sys
import dns.exception, dns.message, dns.query
name, kind = sys.argv[1], sys.argv[2]
if kind == "system":
    try:
        print(json.dumps({"addresses": sorted({a[4][0] for a in socket.getaddrinfo(name, None, socket.AF_INET)})}))
    except socket.gaierror as e:
        print(json.dumps({"error": str(e)}))
    sys.exit(0)
try:
    if kind == "raw":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        s.sendto(bytes.fromhex(name), ("100.100.100.100", 53))
        r = dns.message.from_wire(s.recv(4096))
    else:
        r = dns.query.udp(dns.message.make_query(name, kind), "100.100.100.100", timeout=2)
    print(json.dumps({"rcode": r.rcode(), "answers": sorted(rd.to_text() for rs in r.answer for rd in rs)}))
except (dns.exception.Timeout, socket.timeout):
    print(json.dumps({"timeout": True}))
"""


class DnsLab(AgentsLab):
    def __init__(self, tmp: str):
        super().__init__()
        try:
            host = self.lab.connect_host()
            self.ns = {label: self.lab.add(label, f"192.0.2.{i}/24")
                       for i, label in enumerate(("a", "b", "c"), 1)}
            self.up = self.lab.add("u", f"{UPSTREAM}/24")
            self.up.run("ip", "addr", "add", f"{SPLIT}/24", "dev", "eth0")
            resolver = self.up.spawn(sys.executable, "-c", FAKE_RESOLVER, UPSTREAM, SPLIT,
                                     stdout=subprocess.PIPE, text=True)
            assert resolver.stdout.readline().strip() == "listening"
            for ns in self.ns.values():
                with open(self.resolv_conf(ns.label), "w") as f:
                    f.write(ORIGINAL_RESOLV_CONF)
            self.start_cluster(tmp, host)
            self.ephemeral_key = self.admin("POST", "/api/v1/preauth-keys", {
                "user": harness.BENCH_USER, "ephemeral": True})["key"]
            for label in ("a", "b"):
                self.start(label)
            for label in ("a", "b"):
                wait_for(lambda lb=label: len(self.agents[lb].status().get("peers", ())) == 1, 30,
                         what=f"agent {label} sees its peer")
        except BaseException:
            self.close()
            raise

    def resolv_conf(self, label: str) -> str:
        return f"/etc/netns/{self.ns[label].name}/resolv.conf"

    def admin(self, method: str, path: str, body=None, expect: int | None = None) -> dict:
        for r in self.cluster.replicas:
            status, answer = self.cluster.request(r, method, path, body)
            if status < 500:
                assert expect is None or status == expect, (status, answer)
                return answer
        raise AssertionError(f"{method} {path}: no replica answered")

    def query(self, name: str, kind: str = "A", frm: str = "a") -> dict:
        out = self.ns[frm].run(sys.executable, "-c", QUERY, name, kind, timeout=20).stdout
        return json.loads(out)

    def node_id(self, label: str) -> str:
        return self.agents[label].status()["node_id"]

    def overlay(self, label: str) -> str:
        return self.agents[label].status()["addresses"][0].split("/")[0]



@pytest.fixture(scope="module")
def dnslab(tmp_path_factory):
    with closing(DnsLab(str(tmp_path_factory.mktemp("dns")))) as lab:
        yield lab


def resolves(lab: DnsLab, name: str, address: str, frm: str = "a") -> bool:
    return lab.query(name, frm=frm).get("answers") == [address]


def test_peers_resolve_by_name_through_the_namespace_resolver(dnslab):
    b = dnslab.overlay("b")
    wait_for(lambda: resolves(dnslab, "host-b.mesh.internal.", b), 20, what="a resolves host-b")
    # the service address is never the source of tunnel traffic
    wait_for(lambda: dnslab.ns["a"].ping(b), 20, what="a pings b through the tunnel")
    with open(dnslab.resolv_conf("a")) as f:
        conf = f.read()
    assert "nameserver 100.100.100.100" in conf and "search mesh.internal lab" in conf
    # the system resolver of the namespace, with the search domain: just the host name
    assert dnslab.query("host-b", "system")["addresses"] == [b]
    assert dnslab.query("host-a.mesh.internal.", "AAAA", frm="b")["answers"] == \
        [dnslab.agents["a"].status()["addresses"][1].split("/")[0]]
    assert dnslab.query("nobody.mesh.internal.")["rcode"] == 3  # NXDOMAIN
    # other names go to the resolver the namespace had before
    assert dnslab.query("example.org.")["answers"] == [UPSTREAM]


def test_dns_settings_and_a_rename_propagate_and_are_audited(dnslab):
    dnslab.admin("PUT", "/api/v1/dns", {"domain": "corp.internal",
                                        "split": {"lab.example": [SPLIT]}}, expect=200)
    b = dnslab.overlay("b")
    wait_for(lambda: resolves(dnslab, "host-b.corp.internal.", b), 20, what="the new domain")
    assert dnslab.query("git.lab.example.")["answers"] == [SPLIT]  # split DNS
    assert dnslab.query("example.org.")["answers"] == [UPSTREAM]
    assert dnslab.query("host-b.mesh.internal.")["answers"] == [UPSTREAM]  # no longer ours
    wait_for(lambda: "search corp.internal" in open(dnslab.resolv_conf("a")).read(), 10,
             what="resolv.conf follows the domain")
    dnslab.admin("PATCH", f"/api/v1/nodes/{dnslab.node_id('b')}", {"name": "database"}, expect=200)
    wait_for(lambda: resolves(dnslab, "database.corp.internal.", b), 20, what="the new name")
    assert dnslab.query("host-b.corp.internal.")["rcode"] == 3
    audit = dnslab.admin("GET", "/api/v1/audit?limit=1000")
    actions = {(e["action"], e["target"]) for e in audit["entries"]}
    assert ("dns.set", "dns") in actions and ("node.update", f"node:{dnslab.node_id('b')}") in actions


def test_bad_packets_and_outsiders_get_errors_or_nothing_and_the_agent_lives_on(dnslab):
    garbage = dnslab.query("12340100000100000000000003666f6f", "raw")  # question cut short
    assert garbage["rcode"] == 1  # FORMERR, with the query's id
    # from outside the mesh: the resolver namespace routes 100.100.100.100 to a's underlay
    dnslab.up.run("ip", "route", "add", "100.100.100.100/32", "via", dnslab.ns["a"].ip)
    outside = json.loads(dnslab.up.run(sys.executable, "-c", QUERY, "database.corp.internal.", "A",
                                       timeout=20).stdout)
    assert outside == {"timeout": True}
    assert dnslab.agents["a"].proc.poll() is None
    assert resolves(dnslab, "database.corp.internal.", dnslab.overlay("b"))


def test_key_expiry_can_be_disabled_for_one_node(dnslab):
    node = dnslab.admin("PUT", f"/api/v1/nodes/{dnslab.node_id('b')}/key-expiry",
                        {"disabled": True}, expect=200)["node"]
    assert node["key_expiry_disabled"] is True and node["key_expiry"] is None
    err = dnslab.admin("PUT", "/api/v1/nodes/nope/key-expiry", {"disabled": True}, expect=404)
    assert err["error"]["code"] == "not_found"


def test_an_ephemeral_node_offline_past_the_limit_is_removed_everywhere(dnslab):
    dnslab.admin("PUT", "/api/v1/lifecycle", {"ephemeral_offline_seconds": 10}, expect=200)
    dnslab.start("c", dnslab.ephemeral_key)
    wait_for(lambda: resolves(dnslab, "host-c.corp.internal.", dnslab.overlay("c")) if
             dnslab.agents["c"].status().get("addresses") else False, 30, what="c resolves")
    c_id = dnslab.node_id("c")
    dnslab.agents["c"].stop()
    wait_for(lambda: dnslab.query("host-c.corp.internal.").get("rcode") == 3, 40,
             what="the ephemeral node removed and gone from a's netmap")
    assert "host-c" not in {p["name"] for p in dnslab.agents["a"].status()["peers"]}
    dnslab.admin("GET", f"/api/v1/nodes/{c_id}", expect=404)
    audit = dnslab.admin("GET", "/api/v1/audit?limit=1000")
    assert ("node.remove_ephemeral", f"node:{c_id}") in {(e["action"], e["target"])
                                                         for e in audit["entries"]}


def test_names_resolve_through_a_full_outage_and_an_agent_restart(dnslab):
    b = dnslab.overlay("b")
    dnslab.cluster.stop_all()
    assert resolves(dnslab, "database.corp.internal.", b)
    dnslab.agents["a"].stop()  # a clean stop gives the namespace its resolv.conf back
    with open(dnslab.resolv_conf("a")) as f:
        assert f.read() == ORIGINAL_RESOLV_CONF
    dnslab.start("a")  # from its cached netmap, no replica reachable
    wait_for(lambda: resolves(dnslab, "database.corp.internal.", b), 30,
             what="names from the cached netmap after a restart")
