"""A replica whose data directory fills up (ENOSPC): it answers 503, never 500 or a false
success, does not crash, loses nothing it acknowledged, and serves again once space returns.

Its data directory is a small tmpfs; a filler file takes every free block, and large policy
versions written through the others fill the rest. Before the fix the replica died of
SIGBUS two writes into the full disk (LMDB writes its sparse file through a writable map).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess

import pytest

from raftmesh.chaos import run as chaos_run
from raftmesh.lab import replica_net as netlab
from raftmesh.lab.local_cluster import LocalCluster

from conftest import wait_until

BIG_POLICY = "// " + "x" * 400_000 + "\n{}\n"  # stored whole: every version fills 400 kB
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (root)")


@pytest.fixture
def tmpfs_cluster(tmp_path):
    """Every data directory a small tmpfs, so that the victim can be chosen by its role."""
    cluster = LocalCluster(str(tmp_path / "c"), replicas=3)
    mounted = []
    try:
        for r in cluster.replicas:
            os.makedirs(r.data_dir)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m,mode=0700", "tmpfs", r.data_dir], check=True)
            mounted.append(r.data_dir)
        cluster.start_all()
        cluster.wait_ready(timeout=60)
        yield cluster
    finally:
        cluster.stop_all()
        for path in mounted:
            subprocess.run(["umount", path], check=False)


def _write(cluster, r, method, path, body):
    try:
        return cluster.request(r, method, path, body, timeout=15)
    except OSError as e:
        return None, repr(e)


@needs_root
@pytest.mark.timeout(180)
@pytest.mark.parametrize("who", ["follower", "leader"])
def test_a_full_disk_is_503_without_a_crash_and_loses_nothing(tmpfs_cluster, who):
    """A full leader stops like a paused one, and the others elect a new leader."""
    cluster = tmpfs_cluster
    leader = cluster.leader()
    victim = leader if who == "leader" else next(r for r in cluster.replicas if r is not leader)
    other = next(r for r in cluster.replicas if r is not victim)
    filler = os.path.join(victim.data_dir, "filler")
    free = os.statvfs(victim.data_dir)
    subprocess.run(["fallocate", "-l", str(free.f_bavail * free.f_frsize), filler], check=True)
    acked_users, acked_policies, answers = [], 0, []

    def victim_refuses():
        nonlocal acked_policies
        status, body = _write(cluster, other, "PUT", "/api/v1/policy", BIG_POLICY)
        acked_policies += status == 200
        name = f"u{len(answers)}"
        status, body = _write(cluster, victim, "POST", "/api/v1/users", {"name": name})
        answers.append((status, body))
        assert victim.alive(), f"the replica with the full disk died: {cluster.log_tail(victim)}"
        assert status in (201, 503), f"{status} {body}"
        if status == 201:
            acked_users.append(name)
        return status == 503 and "disk_full" in body["error"]["message"]

    wait_until(victim_refuses, 120, interval=0, what="the replica with the full disk refusing writes")
    assert acked_policies > 0
    # The others go on without it.
    wait_until(lambda: _write(cluster, other, "POST", "/api/v1/users", {"name": "while-full"})[0] == 201,
               20, what="a write through a replica with space")
    acked_users.append("while-full")

    os.unlink(filler)
    wait_until(lambda: _write(cluster, victim, "POST", "/api/v1/users", {"name": "after"})[0] == 201, 30,
               interval=0.2, what="a write through the replica once space returned")
    status, body = cluster.request(victim, "GET", "/api/v1/users")
    assert status == 200, body
    missing = set(acked_users) - {u["name"] for u in body["users"]}
    assert not missing, f"acknowledged, then lost: {sorted(missing)}"
    status, body = cluster.request(victim, "GET", "/api/v1/policy/versions")
    assert status == 200 and len(body["versions"]) >= acked_policies


@needs_root
@pytest.mark.skipif(bool(netlab.preflight()), reason="needs root, iproute2 and nftables")
@pytest.mark.timeout(240)
def test_a_short_chaos_run_with_full_disks_passes_and_unmounts_them(tmp_path):
    out = tmp_path / "chaos"
    parser = argparse.ArgumentParser()
    chaos_run.add_arguments(parser)
    rc = chaos_run.main(parser.parse_args(["--seed", "3", "--duration", "20", "--faults", "diskfull",
                                           "--out", str(out)]))
    summary = json.loads((out / "summary.json").read_text())
    assert rc == 0, (out / "summary.txt").read_text()
    assert summary["faults_by_kind"] == {"diskfull": 2}
    logs = "".join(p.read_text() for p in (out / "cluster").glob("r*.log"))
    assert "no space left" in logs and "space is back" in logs, "the fault reached ENOSPC and healed"
    assert str(out) not in open("/proc/mounts").read()


def test_powercut_and_diskfull_are_refused_together(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    chaos_run.add_arguments(parser)
    args = parser.parse_args(["--faults", "powercut,diskfull", "--duration", "30", "--out", str(tmp_path)])
    assert chaos_run.main(args) == 2
    assert "run them separately" in capsys.readouterr().err
