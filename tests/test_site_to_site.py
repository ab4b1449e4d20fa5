"""Site to site with real agents (wireguard-go) in namespaces: two "datacenters", each a
LAN of hosts without agents behind two subnet routers. Routes are approved by the policy's
autoApprovers; hosts of site A reach the host of site B the policy allows and nothing
else there; SIGKILLing site B's primary router mid-transfer moves the route to the other
router and the traffic continues through it; a router stopped cleanly takes its
masquerading and forwarding with it."""
from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time

import pytest
from netns import Lab, cleanup_stale, wait_for

from raftmesh.agent.forwarding import nat_table
from raftmesh.lab.local_cluster import LocalCluster
from raftmesh.lab.namespaces import RealAgent
from raftmesh.lab.sites import add_site

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not all(shutil.which(t) for t in ("wireguard-go", "wg", "nft")),
                       reason="needs root, wireguard-go, wg and nft"),
    pytest.mark.timeout(240),
]

USER = "dc"
POLICY = json.dumps({
    "autoApprovers": {"routes": {"10.64.0.0/10": [f"{USER}@"]}},
    "acls": [{"action": "accept", "src": ["10.71.0.0/24"], "dst": ["10.72.0.11:*"]}],
})


class Sites:
    def __init__(self, tmp: str):
        cleanup_stale()
        self.lab, self.cluster, self.agents = Lab(), None, {}
        try:
            host = self.lab.connect_host()
            self.a = add_site(self.lab, 71, [("a1", "192.0.2.11/24"), ("a2", "192.0.2.12/24")],
                              ["ha1"])
            self.b = add_site(self.lab, 72, [("b1", "192.0.2.21/24"), ("b2", "192.0.2.22/24")],
                              ["hb1", "hb2"])
            self.cluster = LocalCluster(os.path.join(tmp, "cluster"), replicas=1, host=host,
                                        extra_args=["--stream-keepalive", "1"])
            self.cluster.start_all()
            self.cluster.wait_ready(timeout=30)
            self.api("POST", "/api/v1/users", {"name": USER})
            key = self.api("POST", "/api/v1/preauth-keys", {"user": USER, "reusable": True})["key"]
            self.api("PUT", "/api/v1/policy", POLICY)
            servers = [r.api_url for r in self.cluster.replicas]
            for site in (self.a, self.b):
                for label, ns in site.routers.items():
                    agent = RealAgent(self.lab, ns, tmp, servers, key, label,
                                      ("--advertise-route", site.lan))
                    self.agents[label] = agent
                    agent.start()
        except BaseException:
            self.close()
            raise

    def api(self, method: str, path: str, body=None):
        status, answer = self.cluster.request(self.cluster.replicas[0], method, path, body)
        assert status in (200, 201), (method, path, status, answer)
        return answer

    def routes(self) -> dict[str, dict]:
        return {r["cidr"]: r for r in self.api("GET", "/api/v1/routes")["routes"]}

    def label_of(self, node_id: str) -> str:
        return next(k for k, a in self.agents.items() if a.status().get("node_id") == node_id)

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        if self.cluster is not None:
            self.cluster.stop_all()
        self.lab.close()


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    s = Sites(str(tmp_path_factory.mktemp("sites")))
    try:
        yield s
    finally:
        s.close()


def all_routers_serving(sites) -> bool:
    table = sites.routes()
    return all(cidr in table and table[cidr]["primary"] and len(table[cidr]["candidates"]) == 2
               and all(c["eligible"] for c in table[cidr]["candidates"])
               for cidr in (sites.a.lan, sites.b.lan))


def test_site_a_reaches_site_b_as_the_policy_allows(sites):
    wait_for(lambda: all_routers_serving(sites), 60, what="both sites' routes approved and online")
    sites.a.route_hosts_via(sites.label_of(sites.routes()[sites.a.lan]["primary"]))
    ha1 = sites.a.hosts["ha1"]
    hb1, hb2 = sites.b.hosts["hb1"], sites.b.hosts["hb2"]
    wait_for(lambda: ha1.ping(sites.b.lan_ip("hb1")), 30, what="ha1 reaches hb1 across the sites")
    hb1.tcp_server(8080)
    hb2.tcp_server(8080)
    assert ha1.tcp_connect(sites.b.lan_ip("hb1"), 8080) == "ok"
    # hb2 is behind the same routers, but the policy allows only hb1
    assert ha1.tcp_connect(sites.b.lan_ip("hb2"), 8080) == "timeout"
    assert not ha1.ping(sites.b.lan_ip("hb2"))
    # and nothing allows site B into site A
    assert not hb1.ping(sites.a.lan_ip("ha1"))
    # masquerading: hb1 sees the router's LAN address, not ha1's
    primary_b = sites.label_of(sites.routes()[sites.b.lan]["primary"])
    rules = sites.b.routers[primary_b].run("nft", "list", "table", "inet",
                                           nat_table(sites.agents[primary_b].ifname)).stdout
    assert "masquerade" in rules


def test_killing_site_b_primary_moves_traffic_to_the_other_router(sites):
    wait_for(lambda: all_routers_serving(sites), 60, what="both sites' routes approved and online")
    ha1 = sites.a.hosts["ha1"]
    target = sites.b.lan_ip("hb1")
    wait_for(lambda: ha1.ping(target), 30, what="ha1 reaches hb1")
    before = sites.routes()[sites.b.lan]["primary"]
    victim = sites.label_of(before)
    pinger = ha1.pinger(target, interval=0.05, timeout=0.3)
    try:
        assert _read(pinger, 20, 10).count(".") >= 15, "no steady traffic before the kill"
        sites.agents[victim].kill_hard()  # SIGKILL mid-transfer, its tunnel too
        killed = time.monotonic()
        seen = _read_until_recovered(pinger, deadline=20)
        recovered = time.monotonic() - killed
    finally:
        pinger.kill()
        pinger.wait(5)
    assert seen.endswith("." * 10), f"traffic did not resume through the secondary: {seen!r}"
    after = sites.routes()[sites.b.lan]
    assert after["primary"] not in (None, before)
    assert {c["id"]: c["eligible"] for c in after["candidates"]}[before] is False
    print(f"failover: traffic back {recovered:.2f}s after SIGKILL; probes {seen!r}")


def test_a_stopped_router_removes_its_masquerading_and_forwarding(sites):
    standby = next(lb for lb in sites.a.routers
                   if sites.agents[lb].status().get("node_id") != sites.routes()[sites.a.lan]["primary"])
    agent, ns = sites.agents[standby], sites.a.routers[standby]
    assert ns.run("nft", "list", "table", "inet", nat_table(agent.ifname), check=False).returncode == 0
    assert ns.run("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
    agent.stop()  # SIGTERM: a clean stop
    assert ns.run("nft", "list", "table", "inet", nat_table(agent.ifname), check=False).returncode != 0
    assert ns.run("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"


def _read(proc: subprocess.Popen, n: int, timeout: float) -> str:
    """Up to `n` probe results (bounded by `timeout`)."""
    out, end = "", time.monotonic() + timeout
    while len(out) < n and (left := end - time.monotonic()) > 0:
        if select.select([proc.stdout], [], [], left)[0]:
            ch = proc.stdout.read(1)
            if not ch:
                break
            out += ch
    return out


def _read_until_recovered(proc: subprocess.Popen, deadline: float) -> str:
    """Probe results until ten in a row succeed after the kill (bounded)."""
    out, end = "", time.monotonic() + deadline
    while not out.endswith("." * 10) and (left := end - time.monotonic()) > 0:
        out += _read(proc, 1, left)
    return out
