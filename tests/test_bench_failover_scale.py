"""The failover and scale benchmarks at a tiny size, only to prove they work end to end.

Real numbers come from `raftmesh bench failover|scale` (docs/benchmarks.md); nothing here
asserts on time, only on outputs that a broken benchmark would get wrong.
"""
import json

import pytest

from conftest import bench_args
from raftmesh.bench import failover as bench_failover
from raftmesh.bench import scale as bench_scale
from raftmesh.lab.processes import pid_running


def test_failover_benchmark_two_rounds_on_five_replicas(tmp_path):
    args = bench_args("failover", ["--rounds", "2", "--replicas", "5", "--out", str(tmp_path)])
    assert bench_failover.main(args) == 0
    saved = json.loads((tmp_path / "failover.json").read_text())
    rounds = saved["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    ids = {f"r{n}" for n in range(1, 6)}
    for r in rounds:
        assert r["killed"] in ids and r["new_leader"] in ids - {r["killed"]}
        assert r["term_after"] > r["term_before"]
        assert 0 < r["resume_s"] < 30 and 0 < r["election_s"] < 30
        assert r["first_ack_via"] in ids - {r["killed"]}
        assert r["restart_to_ready_s"] > 0
    # the replica killed in round 1 was restarted and rejoined: round 2 found a leader again
    summary = {s["key"]: s for s in saved["summary"]}
    assert summary["resume_s"]["n"] == 2 and summary["resume_s"]["max_ms"] >= summary["resume_s"]["p50_ms"] > 0
    assert saved["target"]["failed_rounds"] == [] and isinstance(saved["target"]["met"], bool)
    assert saved["machine"]["cpus"] >= 1 and saved["config"]["durability"] == "fsync"
    assert saved["config"]["replicas"] == 5
    assert (tmp_path / "failover.png").stat().st_size > 1000
    assert len(saved["replica_pids"]) == 7  # 5 started + 1 restart per round
    assert not [p for p in saved["replica_pids"] if pid_running(p)]


@pytest.mark.parametrize("name, option, value, complaint", [
    ("failover", "--replicas", "2", "at least 3 needed (a killed replica must leave a quorum), got 2"),
    ("stream-failover", "--replicas", "1", "at least 3 needed"),
    ("writes", "--replicas", "0", "at least 1 needed, got 0"),
    ("propagation", "--replicas", "three", "'three' is not a whole number"),
    ("writes", "--rounds", "0", "at least 1 needed, got 0"),
])
def test_a_count_a_benchmark_cannot_use_is_refused_by_name(capsys, name, option, value, complaint):
    with pytest.raises(SystemExit) as exited:
        bench_args(name, [option, value])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert option in err and complaint in err


def test_scale_benchmark_tiny(tmp_path):
    args = bench_args("scale", ["--sizes", "50,200", "--changes", "20", "--policy-changes", "2",
                               "--reference-at", "200", "--profile", "--out", str(tmp_path)])
    assert bench_scale.main(args) == 0
    saved = json.loads((tmp_path / "scale.json").read_text())
    sizes = saved["sizes"]
    assert [s["n"] for s in sizes] == [50, 200]
    for s in sizes:
        assert s["acls"] >= 20 and s["edges"] > 0 and s["build_cpu_s"] > 0
        assert set(s["kinds"]) == {"endpoint", "retag", "add", "delete", "policy"}
        for kind, st in s["kinds"].items():
            assert st["n"] == (2 if kind == "policy" else 20)
            assert 0 < st["p50_ms"] <= st["p99_ms"] <= st["max_ms"]
        assert s["kinds"]["endpoint"]["deltas_max"] > 0  # a node's peers hear about it
    ratio = saved["reference_ratio"]
    assert ratio["nodes"] == 200 and ratio["compute_netmaps_ms"] > 0 and ratio["endpoint_x"] > 0
    assert "compute_netmaps_cpu_s" not in sizes[0]  # only at --reference-at
    prof = sizes[1]["profile"]
    assert prof["changes"] == 80 and prof["by_own_time"][0]["tottime_s"] > 0
    assert "_apply" in " ".join(p["function"] for p in prof["by_cumulative_time"])
    assert all(0 <= st["gc_share"] <= 1 for s in sizes for st in s["kinds"].values())
    assert saved["target"]["at_nodes"] == 200 and isinstance(saved["target"]["met_at_p99"], bool)
    assert (tmp_path / "scale.png").stat().st_size > 1000


def test_scale_network_has_every_role_even_when_tiny():
    """The synthetic network keeps its shape (every tag, users in groups) at small N."""
    net = bench_scale.Network(50, seed=3)
    tags = {t for n in net.nodes.values() for t in n["tags"]}
    assert tags == {t for t, _ in bench_scale.TAG_SHARES}
    assert len(net.nodes) >= 50 and len({n["ipv4"] for n in net.nodes.values()}) == len(net.nodes)
    assert all(net.groups[g] for g in ("group:eng", "group:sre", "group:admins"))
    pol = net.policy()
    assert 25 <= len(pol.acls) <= 50 and len(net.policy(extra_acl=True).acls) == len(pol.acls) + 1


@pytest.mark.parametrize("name, dest, value", [
    ("propagation", "sizes", "4,10"), ("dns-propagation", "sizes", "4,10"), ("revoke", "light", 10), ("stream-memory", "streams", 20),
    ("stream-failover", "agents", 9)])
def test_agents_names_the_agent_count_of_every_agent_benchmark(name, dest, value):
    """Issue #5's command line is `raftmesh bench <name> [--agents N] [--replicas 3]`."""
    assert getattr(bench_args(name, ["--agents", str(value)]), dest) == value
