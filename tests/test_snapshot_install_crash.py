"""SIGKILL of a replica while it receives a snapshot from the leader: restarted, it catches
up and loses nothing (the chaos `crash` fault times a SIGKILL into a membership change; this
one is timed into a snapshot install, which a schedule cannot aim at)."""
from __future__ import annotations

import os
import signal

import pytest

from conftest import wait_until
from test_cluster import create_user, fall_behind_a_compacted_log, user_names

BIG_POLICY = "// {}" + "x" * 300_000 + "\n{{}}\n"  # every version is stored: a large snapshot
INCOMING = "raft.snapshot.1.tmp"  # pysyncobj's file for a snapshot being received


def _policy_versions(c, r) -> int:
    status, body = c.request(r, "GET", "/api/v1/policy/versions?stale=true")
    return len(body["versions"]) if status == 200 else -1


@pytest.mark.timeout(180)
def test_a_replica_killed_while_a_snapshot_arrives_catches_up_and_loses_nothing(make_cluster):
    c = make_cluster(3, extra_args=["--snapshot-min-entries", "20"])

    def write(r, i):  # 24 large policy versions, then 60 users
        if i < 24:
            assert c.request(r, "PUT", "/api/v1/policy", BIG_POLICY.format(i))[0] == 200
        else:
            assert create_user(c, r, f"k{i - 24}")[0] == 201
    lagging, live = fall_behind_a_compacted_log(c, write, 84, 40)

    incoming = os.path.join(lagging.data_dir, INCOMING)
    c.start(lagging)
    wait_until(lambda: os.path.exists(incoming), 30, interval=0.002, what="the snapshot arriving")
    c.kill(lagging, signal.SIGKILL)  # mid-transfer
    c.start(lagging)
    wait_until(lambda: os.path.exists(incoming), 30, interval=0.002, what="the snapshot arriving again")
    wait_until(lambda: not os.path.exists(incoming), 30, interval=0.002, what="the snapshot received")
    c.kill(lagging, signal.SIGKILL)  # while the state store is rebuilt from it, or just after
    c.start(lagging)
    c.wait_ready([lagging], timeout=60)
    wait_until(lambda: {f"k{i}" for i in range(60)} <= user_names(c, lagging, stale=True), 60,
               what="the killed replica catching up")
    assert _policy_versions(c, lagging) == _policy_versions(c, live[0]) >= 24
    assert create_user(c, lagging, "after")[0] == 201
    metrics = c.request(lagging, "GET", "/metrics")[1]
    installs = [l for l in metrics.splitlines() if l.startswith("raftmesh_snapshot_installs_total")]
    assert installs and float(installs[0].split()[-1]) >= 1, "caught up through a snapshot"
