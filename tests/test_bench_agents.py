"""The agent-facing benchmarks (issue #5) at a tiny size, only to prove they work end to end.

Real numbers come from `raftmesh bench propagation|revoke|stream-failover|stream-memory|connect|policy`
(docs/benchmarks.md). Nothing here asserts on time, only on outputs a broken benchmark would
get wrong; every replica, light-agent worker and daemon must be gone afterwards, and the
real-WireGuard ones must leave no namespace behind.
"""
import json
import os
import shutil

import pytest

from conftest import bench_args
from raftmesh.bench import (baseline, connect, dns_propagation, lockdown, policy, propagation,
                            revoke, stream_failover, stream_memory)
from raftmesh.cluster.policy import MAX_ENTRIES, MAX_POLICY_BYTES, parse_policy
from raftmesh.lab import namespaces
from raftmesh.lab.processes import pid_running

pytestmark = pytest.mark.timeout(300)
needs_lab = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("wireguard-go") is None,
    reason="needs root and wireguard-go for namespaces")


def my_namespaces() -> list[str]:
    return [n for n in namespaces.list_netns() if n.startswith(f"{namespaces.LAB_PREFIX}{os.getpid()}x")]


def test_propagation_side_by_side_with_a_baseline_checkout(tmp_path):
    """--baseline runs the same on another checkout first (here this one, to keep the test
    self-contained) and prints and saves both, with ratios."""
    tree = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = bench_args("propagation", ["--sizes", "4", "--changes", "1", "--workers", "1",
                                     "--stream-keepalive", "2", "--baseline", tree,
                                     "--out", str(tmp_path)])
    assert propagation.main(args) == 0
    assert json.loads((tmp_path / "baseline" / "propagation.json").read_text())["sizes"][0]["missing"] == 0
    rows = json.loads((tmp_path / "propagation-compare.json").read_text())["rows"]
    assert [(r["code"], r["agents"]) for r in rows] == [("baseline", 4), ("this", 4)]
    assert all(r["replica_us_per_delta"] >= 0 and r["agent_us_per_delta"] >= 0 for r in rows)
    assert (tmp_path / "propagation-compare.png").stat().st_size > 0


def test_a_baseline_that_is_not_a_checkout_is_refused_by_name(tmp_path):
    with pytest.raises(RuntimeError, match="not a raftmesh checkout"):
        baseline.run(str(tmp_path), ["propagation"], str(tmp_path), timeout=10)


def test_propagation_tiny(tmp_path):
    args = bench_args("propagation", ["--sizes", "4,10", "--changes", "2", "--workers", "2",
                                     "--stream-keepalive", "2", "--out", str(tmp_path)])
    assert propagation.main(args) == 0
    saved = json.loads((tmp_path / "propagation.json").read_text())
    assert [s["agents"] for s in saved["sizes"]] == [4, 10]
    for s in saved["sizes"]:
        assert s["missing"] == 0
        assert s["apply"]["n"] == s["acked"]["n"] == 2 * s["agents"]
        assert len(s["changes"]) == 2 and all(c["agents"] == s["agents"] for c in s["changes"])
        assert s["changes"][1]["version"] > s["changes"][0]["version"]
        # every ack of the measured changes reached the replicas' histogram too
        assert s["server_histogram"]["count"] >= 2 * s["agents"]
        assert s["apply"]["max_ms"] >= s["apply"]["p50_ms"]
        # CPU comes in clock ticks (10 ms): a tiny change can cost the agents less than one
        assert s["replica_cpu_s_per_change"] > 0 and s["agent_cpu_s_per_change"] >= 0
        # the replicas' CPU split by thread, from their raftmesh_thread_cpu_seconds_total
        assert {"event-loop", "raft", "netmap-feed"} <= set(s["delivery_cpu_s_by_thread"])
        assert all(v >= 0 for v in s["delivery_cpu_s_by_thread"].values())
    st = saved["final_status"]
    assert st["agents"] == 10 and st["connected"] == 10 and st["frame_errors"] == []
    assert st["ack_datagrams"] >= 2 * 10  # the measured changes' acks came as datagrams
    assert set(st["by_replica"]) == {"r1", "r2", "r3"}
    assert (tmp_path / "propagation.png").stat().st_size > 1000
    assert saved["pids"] and not [p for p in saved["pids"] if pid_running(p)]


def test_dns_propagation_tiny(tmp_path):
    """The same measurement with DNS changes: every agent gets the new settings."""
    args = bench_args("dns-propagation", ["--sizes", "4", "--changes", "2", "--workers", "1",
                                         "--stream-keepalive", "2", "--out", str(tmp_path)])
    assert dns_propagation.main(args) == 0
    saved = json.loads((tmp_path / "dns-propagation.json").read_text())
    (size,) = saved["sizes"]
    assert size["missing"] == 0 and size["apply"]["n"] == 2 * 4
    assert saved["config"]["change"] == "dns" and saved["targets"] == []


def test_revoke_light_tiny(tmp_path):
    args = bench_args("revoke", ["--light", "10", "--light-rounds", "2", "--real", "0",
                                "--workers", "2", "--stream-keepalive", "2", "--out", str(tmp_path)])
    assert revoke.main(args) == 0
    saved = json.loads((tmp_path / "revoke.json").read_text())
    light = saved["light"]
    assert light["missing"] == 0 and light["removed"]["n"] == light["acked"]["n"] == 20
    victims = [r["victim"] for r in light["rounds"]]
    assert len(set(victims)) == 2
    for r in light["rounds"]:
        assert r["peers_having_it"] == 10 and r["measured"] == 10
    assert light["server_histogram"]["count"] >= 20
    assert light["final_status"]["byes"] == 2  # the revoked svc agents got a bye (or 404)
    assert "real" not in saved and (tmp_path / "revoke.png").stat().st_size > 1000
    assert not [p for p in saved["pids"] if pid_running(p)]


def test_stream_failover_tiny(tmp_path):
    args = bench_args("stream-failover", ["--agents", "9", "--rounds", "2", "--workers", "1",
                                         "--stream-keepalive", "2", "--out", str(tmp_path)])
    assert stream_failover.main(args) == 0
    saved = json.loads((tmp_path / "stream-failover.json").read_text())
    rounds = saved["rounds"]
    assert [r["killed"] for r in rounds] == ["r1", "r2"]
    for r in rounds:
        assert r["agents_on_killed"] == 3 and r["missing"] == 0  # agents i mod 3 stream from r(i+1)
        assert r["current_max_ms"] >= r["current_p50_ms"] > 0
        assert r["reconnect_max_ms"] is not None and r["write_via"] != r["killed"]
    killed = {s["metric"]: s for s in saved["summary"]}
    assert killed["kill -> agent of the killed replica holds the change"]["n"] == 6
    assert isinstance(saved["target"]["met"], bool) and saved["target"]["failed_rounds"] == []
    assert saved["final_status"]["connected"] == 9
    assert len(saved["pids"]) == 3 + 1 + 2  # replicas, one worker, one restart per round
    assert not [p for p in saved["pids"] if pid_running(p)]


def test_stream_memory_tiny(tmp_path):
    args = bench_args("stream-memory", ["--streams", "20", "--steps", "2", "--workers", "3",
                                       "--out", str(tmp_path)])
    assert stream_memory.main(args) == 0
    saved = json.loads((tmp_path / "stream-memory.json").read_text())
    assert [p["streams"] for p in saved["points"]] == [0, 10, 20]  # all on r1, per its gauge
    assert all(p["rss_kib"] > 10_000 for p in saved["points"])
    assert isinstance(saved["per_stream_kib"], float) and saved["target"]["at_streams"] == 20
    assert saved["final_status"]["by_replica"] == {"r1": 20}
    assert (tmp_path / "stream-memory.png").stat().st_size > 1000
    assert not [p for p in saved["pids"] if pid_running(p)]


@needs_lab
def test_revoke_real_wireguard_tiny(tmp_path):
    args = bench_args("revoke", ["--light", "0", "--real", "2", "--real-rounds", "2",
                                "--stream-keepalive", "2", "--out", str(tmp_path)])
    try:
        assert revoke.main(args) == 0
    finally:
        assert my_namespaces() == []
    saved = json.loads((tmp_path / "revoke.json").read_text())
    real = saved["real"]
    assert real["missing"] == 0 and real["removed"]["n"] == 4
    assert [r["peers"] for r in real["rounds"]] == [2, 2]
    assert real["server_histogram"]["count"] >= 4, real["logs"]  # the daemons ack the removal too
    assert not [p for p in saved["pids"] if pid_running(p)]


@needs_lab
def test_connect_tiny(tmp_path):
    args = bench_args("connect", ["--rounds", "2", "--stream-keepalive", "2", "--nat", "none",
                                  "--no-nebula", "--out", str(tmp_path)])
    try:
        assert connect.main(args) == 0
    finally:
        assert my_namespaces() == []
    saved = json.loads((tmp_path / "connect.json").read_text())
    rounds = saved["rounds"]
    assert len(rounds) == 2 and saved["failed_rounds"] == []
    for r in rounds:
        assert r["connect_ms"] > 0 and r["probes_sent"] >= 1 and r["node_id"]
        assert r["stream_connected_ms"] is not None
    assert len({r["node_id"] for r in rounds}) == 2
    assert (tmp_path / "connect.png").stat().st_size > 1000
    assert not [p for p in saved["pids"] if pid_running(p)]


def test_policy_tiny(tmp_path):
    args = bench_args("policy", ["--rules", "200", "--nodes", "3", "--out", str(tmp_path)])
    assert policy.main(args) == 0
    saved = json.loads((tmp_path / "policy.json").read_text())
    assert [s["step"] for s in saved["steps"]] == ["baseline", "validate", "apply"]
    applied = saved["steps"][2]
    assert set(applied["netmaps_at_version_s"]) == {"r1", "r2", "r3"} and applied["version"] > 0
    assert saved["healthz_failed"] == 0 and "raft_term_changes" in saved
    assert {(r["step"], r["replica"]) for r in saved["rows"] if r["healthz"] > 0} >= \
        {("baseline", rid) for rid in ("r1", "r2", "r3")}
    assert "netmap-feed" in saved["apply_cpu_s_by_thread"] and "0 count" in saved["apply_gc_pauses"]
    assert (tmp_path / "policy.png").stat().st_size > 1000
    assert not any(pid_running(p) for p in saved["pids"])


def test_the_benchmark_policy_of_20000_rules_fits_the_limits():
    text = policy.policy_text(MAX_ENTRIES["acls"], ["bench", "svc", "u1"])
    assert len(text.encode()) <= MAX_POLICY_BYTES
    assert len(parse_policy(text).acls) == MAX_ENTRIES["acls"]


@needs_lab
def test_lockdown_real_wireguard_tiny(tmp_path):
    args = bench_args("lockdown", ["--real", "2", "--rounds", "2", "--stream-keepalive", "2",
                                  "--out", str(tmp_path)])
    try:
        assert lockdown.main(args) == 0
    finally:
        assert my_namespaces() == []
    saved = json.loads((tmp_path / "lockdown.json").read_text())
    for via in ("lock", "scim"):
        assert saved[via]["missing"] == 0 and saved[via]["removed"]["n"] == 4, saved[via]
    assert [t["via"] for t in saved["targets"]] == ["lock", "scim"]
    assert not [p for p in saved["pids"] if pid_running(p)]
