"""Every benchmark runs at a tiny size, only to prove it works end to end."""
import json
import os

import pytest

from raftmesh.bench import writes as bench_writes
from raftmesh.bench.report import mean_interval
from raftmesh.bench.workdir import WorkDir
from raftmesh.lab.processes import child_pids, pid_running


def test_writes_benchmark_tiny(tmp_path):
    result = bench_writes.run(str(tmp_path), seconds=0.5, concurrency=4, with_etcd=True, rounds=2)
    rows = result["rows"]
    assert {r["system"] for r in rows} >= {"raftmesh"}
    assert all(r["n"] > 0 for r in rows if r["system"] == "raftmesh")
    # one client through the leader and the concurrent shape ran once per round each, their
    # samples pooled in one row per system; one client through a follower ran once
    assert {(r["shape"], r["rounds"]) for r in rows if r["system"] == "raftmesh"} == \
        {("1 client via follower", 1), (bench_writes.ONE_CLIENT, 2), ("4 clients, all replicas", 2)}
    concurrent = [r for r in rows if r["clients"] == 4]
    assert [r["round"] for r in result["per_round"]] == [1, 2]
    # the replicas' CPU per write split by thread (raftmesh_thread_cpu_seconds_total)
    ours = next(r for r in concurrent if r["system"] == "raftmesh")
    assert ours["server_cpu_us_per_write_by_thread"]["raft"] > 0
    assert ours["server_cpu_us_per_write_by_thread"]["event-loop"] > 0
    if bench_writes.EtcdCluster.available():
        assert {(r["shape"], r["rounds"]) for r in rows if r["system"] == "etcd"} == \
            {(bench_writes.ONE_CLIENT, 2), ("4 clients, all members", 2)}
        for key in ("ratio", "one_client_ratio"):
            assert all(r[key] > 0 for r in result["per_round"])
            mean, low, high = result[f"{key}_of_rounds_mean_ci95"]
            assert low <= mean <= high
            assert mean == pytest.approx(sum(r[key] for r in result["per_round"]) / 2)
        assert result["throughput_ratio_vs_etcd"] > 0 and result["one_client_ratio_vs_etcd"] > 0
    saved = json.loads((tmp_path / "writes.json").read_text())
    assert saved["machine"]["cpus"] >= 1
    assert (tmp_path / "writes.png").stat().st_size > 1000


@pytest.mark.skipif(not bench_writes.EtcdCluster.available(), reason="Debian etcd-server not installed")
def test_etcd_one_client_shape_writes_to_the_member_that_leads(tmp_path):
    etcd = bench_writes.EtcdCluster(str(tmp_path), 3)
    try:
        etcd.start()
        chosen = etcd.leader_url()
        statuses = {url: etcd.status(url) for url in etcd.client_urls}
        leads = {url: s["leader"] == s["header"]["member_id"] for url, s in statuses.items()}
        assert leads[chosen] and sum(leads.values()) == 1
    finally:
        etcd.stop()


def test_mean_interval_is_students_t_interval():
    mean, low, high = mean_interval([1, 2, 3, 4, 5])  # sd 1.581, t(0.975, 4) = 2.776
    assert mean == 3 and low == pytest.approx(1.037, abs=1e-3) and high == pytest.approx(4.963, abs=1e-3)
    assert mean_interval([0.97] * 40) == pytest.approx((0.97, 0.97, 0.97))
    assert mean_interval([1.0]) is None  # one round says nothing about its noise


def test_writes_benchmark_on_one_replica_against_one_etcd_member(tmp_path):
    """--replicas sizes both systems alike; with one replica there is no follower shape."""
    result = bench_writes.run(str(tmp_path), seconds=0.5, concurrency=4, with_etcd=True,
                              replicas=1)
    assert result["replicas"] == 1
    shapes = {(r["system"], r["shape"]) for r in result["rows"]}
    assert ("raftmesh", "1 client via leader") in shapes
    assert not [s for s in shapes if "follower" in s[1] and s[0] == "raftmesh"]
    assert all(r["n"] > 0 for r in result["rows"])
    if bench_writes.EtcdCluster.available():
        assert ("etcd", "4 clients, all members") in shapes


def test_a_benchmark_stopped_with_sigterm_ends_the_replicas_it_started(tmp_path):
    """Operators stop long runs with SIGTERM (systemd, timeout, kill): what a run started must
    not outlive it."""
    import signal
    import subprocess
    import sys

    from conftest import wait_until
    # Its work directory (replica logs, kept when a run is cut short) goes under tmp_path.
    out = open(tmp_path / "stdout", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "raftmesh.cli.main", "bench", "writes",
                             "--seconds", "120", "--no-etcd", "--out", str(tmp_path)],
                            stdout=out, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, TMPDIR=str(tmp_path)))
    children: list[int] = []
    try:
        wait_until(lambda: len(child_pids(proc.pid)) >= 3, 60, what="the bench starts 3 replicas")
        children = child_pids(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        assert "SIGTERM, stopping" in proc.stderr.read()
        wait_until(lambda: not any(pid_running(c) for c in children), 30,
                   what="the replicas end with the bench")
        kept = [d for d in tmp_path.iterdir() if d.name.startswith("raftmesh-bench-writes-")]
        assert len(kept) == 1 and (kept[0] / "raftmesh" / "r1.log").is_file()
        out.seek(0)
        assert f"logs kept in {kept[0]}" in out.read(), "a run cut short names what it kept"
    finally:
        for pid in [proc.pid] + children:
            if pid_running(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)
        out.close()


def test_sigterm_also_ends_children_the_run_lost_track_of(tmp_path):
    """SIGTERM can interrupt subprocess.Popen after its fork, before the run holds the Popen:
    the wrapper ends any child still running by pid after the run's own cleanup."""
    import signal
    import subprocess
    import sys

    from conftest import wait_until
    program = tmp_path / "run.py"
    program.write_text(
        "import subprocess, sys, time\n"
        "from raftmesh.lab.processes import cleaned_up_on_sigterm\n"
        "def main(args):\n"
        "    subprocess.Popen(['sleep', '600'])  # dropped: nobody will stop it\n"
        "    print('started', flush=True)\n"
        "    time.sleep(600)\n"
        "sys.exit(cleaned_up_on_sigterm(main)(None))\n")
    proc = subprocess.Popen([sys.executable, str(program)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    children: list[int] = []
    try:
        assert proc.stdout.readline().strip() == "started"
        children = child_pids(proc.pid)
        assert len(children) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        wait_until(lambda: not pid_running(children[0]), 10, what="the lost child ends")
    finally:
        for pid in [proc.pid] + children:
            if pid_running(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_a_bench_work_directory_goes_when_the_run_ends_well_and_is_named_when_not(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    good, bad = WorkDir("x"), WorkDir("x")
    assert os.path.dirname(good.path) == str(tmp_path)
    good.close(ok=True)
    bad.close(ok=False, why="round 3 failed")
    assert not os.path.exists(good.path) and os.path.isdir(bad.path)
    assert capsys.readouterr().out == f"round 3 failed; logs kept in {bad.path}\n"
