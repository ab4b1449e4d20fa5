"""The route benchmarks (issue #23) at a tiny size, only to prove they work end to end.

Real numbers come from `raftmesh bench route-propagation|route-failover` (docs/benchmarks.md).
Nothing here asserts on time; every process must be gone afterwards, and the
real-WireGuard one must leave no namespace behind.
"""
import json
import os
import shutil

import pytest

from conftest import bench_args
from raftmesh.bench import route_failover, route_propagation
from raftmesh.lab import namespaces
from raftmesh.lab.processes import pid_running

pytestmark = pytest.mark.timeout(300)


def test_route_propagation_tiny(tmp_path):
    args = bench_args("route-propagation", ["--sizes", "5", "--changes", "2", "--workers", "1",
                                           "--replicas", "1", "--stream-keepalive", "2",
                                           "--out", str(tmp_path)])
    assert route_propagation.main(args) == 0
    saved = json.loads((tmp_path / "route-propagation.json").read_text())
    (size,) = saved["sizes"]
    assert size["agents"] == 5 and size["missing"] == 0 and size["apply"]["n"] == 10
    assert len(size["all_applied_s"]) == 2
    assert (tmp_path / "route-propagation.png").stat().st_size > 1000
    assert saved["pids"] and not [p for p in saved["pids"] if pid_running(p)]


@pytest.mark.skipif(os.geteuid() != 0 or not all(shutil.which(t) for t in ("wireguard-go", "nft")),
                    reason="needs root, wireguard-go and nft for namespaces")
def test_route_failover_tiny(tmp_path):
    args = bench_args("route-failover", ["--rounds", "2", "--out", str(tmp_path)])
    assert route_failover.main(args) == 0
    saved = json.loads((tmp_path / "route-failover.json").read_text())
    assert [r["round"] for r in saved["rounds"]] == [1, 2] and saved["missing"] == 0
    # the standby took over each time, so the two rounds killed both routers
    assert {r["killed"] for r in saved["rounds"]} == {"b1", "b2"}
    assert all(r["primary_now"] != r["killed"] for r in saved["rounds"])
    assert saved["pids"] and not [p for p in saved["pids"] if pid_running(p)]
    assert not [n for n in namespaces.list_netns()
                if n.startswith(f"{namespaces.LAB_PREFIX}{os.getpid()}x")]
