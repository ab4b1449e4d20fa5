"""Site to site with real agents (wireguard-go) in namespaces: two "datacenters", each a
LAN of hosts without agents behind two subnet routers. Routes are approved by the policy's
autoApprovers; hosts of site A reach the host of site B the policy allows and nothing
else there; SIGKILLing site B's primary router mid-transfer moves the route to the other
router and the traffic continues through it; a router stopped cleanly takes its
masquerading and forwarding with it."""
from __future__ import annotations

import os
import select
import shutil
import subprocess
import time

import pytest
from netns import Lab, cleanup_stale, wait_for

from raftmesh.agent.forwarding import nat_table
from raftmesh.lab.sites import TwoSites

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not all(shutil.which(t) for t in ("wireguard-go", "wg", "nft")),
                       reason="needs root, wireguard-go, wg and nft"),
    pytest.mark.timeout(240),
]


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    cleanup_stale()
    s = TwoSites(Lab(), str(tmp_path_factory.mktemp("sites")))
    try:
        yield s
    finally:
        s.close()


def test_site_a_reaches_site_b_as_the_policy_allows(sites):
    wait_for(sites.all_serving, 60, what="both sites' routes approved and online")
    sites.a.route_hosts_via(sites.primary(sites.a))
    sites.b.route_hosts_via(sites.primary(sites.b))
    ha1 = sites.a.hosts["ha1"]
    hb1, hb2 = sites.b.hosts["hb1"], sites.b.hosts["hb2"]
    wait_for(lambda: ha1.ping(sites.b.lan_ip("hb1")), 30, what="ha1 reaches hb1 across the sites")
    hb1.tcp_server(8080)
    hb2.tcp_server(8080)
    assert ha1.tcp_connect(sites.b.lan_ip("hb1"), 8080) == "ok"
    # hb2 is behind the same routers, but the policy allows only hb1
    assert ha1.tcp_connect(sites.b.lan_ip("hb2"), 8080) == "timeout"
    assert not ha1.ping(sites.b.lan_ip("hb2"))
    # and nothing allows site B into site A (site A's router drops it)
    assert not hb1.ping(sites.a.lan_ip("ha1"))
    # the way in is masqueraded, so site B needs no route back into the mesh
    primary_b = sites.primary(sites.b)
    rules = sites.b.routers[primary_b].run("nft", "list", "table", "inet",
                                           nat_table(sites.agents[primary_b].ifname)).stdout
    assert "masquerade" in rules


def test_killing_site_b_primary_moves_traffic_to_the_other_router(sites):
    wait_for(sites.all_serving, 60, what="both sites' routes approved and online")
    ha1 = sites.a.hosts["ha1"]
    target = sites.b.lan_ip("hb1")
    wait_for(lambda: ha1.ping(target), 30, what="ha1 reaches hb1")
    before = sites.routes()[sites.b.lan]["primary"]
    victim = sites.primary(sites.b)
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
    standby = next(lb for lb in sites.a.routers if lb != sites.primary(sites.a))
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
