"""The geo lab (issue #26): per-link round trips, and `raftmesh bench geo` at a tiny size.

Real numbers come from `raftmesh bench geo` (docs/geo.md). The delays are asserted only as
lower bounds (a loaded machine adds time, never removes it); every replica, proxy and
light-agent worker must be gone afterwards, and no namespace left behind.
"""
import json
import os
import time
import urllib.request

import pytest

from conftest import bench_args
from raftmesh.bench import geo
from raftmesh.lab import replica_net
from raftmesh.lab.geo_net import API_PORT, RAFT_PORT, GeoNet, parse_topology
from raftmesh.lab.local_cluster import LocalCluster
from raftmesh.lab.processes import pid_running, run

pytestmark = pytest.mark.timeout(420)
needs_netns = pytest.mark.skipif(bool(replica_net.preflight()), reason="needs root, iproute2 and nftables")


def my_namespaces() -> list[str]:
    tag = f"{replica_net.PREFIX}{os.getpid() % 10**7}x"
    return [line.split()[0] for line in run(["ip", "netns", "list"], check=False).stdout.splitlines()
            if line.startswith(tag)]


def test_topology_reads_pairs_and_computes_the_write_floor():
    t = parse_topology("40,80,150", local_rtt_ms=2)
    assert t.regions == 3 and t.rtt_ms[0][1] == t.rtt_ms[1][0] == 40 and t.rtt_ms[1][2] == 150
    assert t.link_rtt_ms(1, 1) == 2 and t.link_rtt_ms(1, 2) == 150
    # the leader r1 commits with r2 (40 ms); a write via r3 also goes to r1 and back (80 ms)
    assert t.write_floor_ms(0, 0) == 2 + 40
    assert t.write_floor_ms(2, 0) == 2 + 80 + 40
    assert parse_topology("1,2,3,4,5,6").regions == 4


@pytest.mark.parametrize("text, complaint", [
    ("40,80", "do not make the pairs of 3 or more regions"),
    ("40,x,150", "comma-separated milliseconds"),
    ("40,0,150", "must be > 0 ms"),
])
def test_a_bad_topology_is_refused_by_name(text, complaint):
    with pytest.raises(ValueError, match=complaint):
        parse_topology(text)


@pytest.mark.parametrize("argv, complaint", [
    (["--rtts", "40,80"], "do not make the pairs"),
    (["--agents", "0"], "--agents must be at least 1, got 0"),
    (["--kills", "-1"], "--kills must be at least 0, got -1"),
])
def test_bench_geo_refuses_bad_options_before_starting_anything(capsys, tmp_path, argv, complaint):
    assert geo.main(bench_args("geo", argv + ["--out", str(tmp_path)])) == 2
    assert complaint in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


@needs_netns
def test_each_region_and_each_replica_pair_gets_its_own_round_trip(tmp_path):
    """A stale read through the proxy costs the region's RTT to that replica (>= it), and a
    write committed by the leader costs at least its RTT to the nearest peer."""
    topology = parse_topology("60,120,240", local_rtt_ms=0)
    with GeoNet(topology, str(tmp_path)) as net:
        cluster = LocalCluster(str(tmp_path / "c"), replicas=3, hosts=net.ips,
                               ports=(RAFT_PORT, API_PORT), command_prefix=net.prefix)
        try:
            cluster.start_all()
            cluster.wait_ready(timeout=90)
            clients = [geo.RegionClient(r.host, net.region_ips[0], cluster.admin_key)
                       for r in cluster.replicas]
            took = []
            for c in clients:
                c.request("GET", "/api/v1/users?stale=true")  # connects
                took.append(min(c.request("GET", "/api/v1/users?stale=true")[1] for _ in range(3)))
            assert took[1] >= 0.060 and took[2] >= 0.120 and took[0] < 0.100  # local: no delay
            leader = cluster.leader()
            nearest = min(topology.rtt_ms[geo.region_of(leader)][j] for j in range(3)
                          if j != geo.region_of(leader))
            c = geo.RegionClient(leader.host, net.region_ips[geo.region_of(leader)], cluster.admin_key)
            status, seconds = c.request("POST", "/api/v1/users", {"name": "geo-probe"})
            assert status == 201 and seconds >= nearest / 1e3
            for c2 in clients + [c]:
                c2.close()
            follower = next(r for r in cluster.replicas if r is not leader)
            req = urllib.request.Request(follower.api_url + "/api/v1/users?stale=true&max_staleness=2",
                                         headers={"Authorization": f"Bearer {cluster.admin_key}"})
            with urllib.request.urlopen(req, timeout=10) as resp:  # heartbeats arrive every 50 ms
                contact = resp.headers["Raftmesh-Staleness"].split(";")[0]
            assert 0 <= int(contact.split("=")[1]) < 2000
            pids = [r.pid for r in cluster.replicas]
        finally:
            cluster.stop_all()
        proxies = net.pids
    assert not [p for p in pids + proxies if pid_running(p)]
    assert my_namespaces() == []


@needs_netns
def test_bench_geo_tiny_end_to_end(tmp_path):
    args = bench_args("geo", ["--rtts", "20,30,40", "--agents", "2", "--writes", "4", "--reads", "2",
                              "--changes", "1", "--kills", "2", "--stream-keepalive", "2", "--timeout", "60",
                              "--out", str(tmp_path)])
    started = time.monotonic()
    assert geo.main(args) == 0
    saved = json.loads((tmp_path / "geo.json").read_text())
    assert [r["region"] for r in saved["regions"]] == [1, 2, 3]
    assert sorted(r["role"] for r in saved["regions"]) == ["follower", "follower", "leader"]
    for r in saved["regions"]:
        assert r["prop_missing"] == 0 and r["write_p50_ms"] >= r["floor_ms"] - 1  # the floor is a floor
    assert saved["elections_in_steady_state"] >= 0
    assert len(saved["leader_failover"]) == 2 and saved["leader_failover_resume"]["n"] == 2
    for fo in saved["leader_failover"]:
        assert fo["new_leader"] != fo["killed"] and 0 < fo["resume_ms"] < 60_000
    afo = saved["agent_failover"]
    assert afo["agents"] == 2 and afo["missing"] == 0 and afo["killed"] not in afo["moved_to"]
    assert afo["moved_to"] and afo["current"]["n"] == 2
    assert (tmp_path / "geo.png").stat().st_size > 1000
    assert not [p for p in saved["pids"] if pid_running(p)]
    assert my_namespaces() == []
    assert time.monotonic() - started < 400
