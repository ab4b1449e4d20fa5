"""`raftmesh chaos run --tunnels`: the data plane keeps working whatever the replicas go
through. The check on hand-made probes, one short run whose first fault kills the replica
the agents stream from, and a run ended by SIGTERM that leaves nothing behind."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from raftmesh.chaos import run as chaos_run
from raftmesh.chaos.tunnels import check_tunnel, tunnel_figures
from raftmesh.lab import namespaces, replica_net as netlab

from test_chaos import _our_processes

needs_agents = pytest.mark.skipif(bool(namespaces.preflight()),
                                  reason="needs root, iproute2, nftables, wg and wireguard-go")


def test_a_lost_ping_fails_the_check_with_its_time_and_the_gap_is_measured():
    probes = [(0.0, 0.01), (0.2, 0.21), (0.4, None), (0.6, None), (0.8, 0.95), (1.0, 1.01)]
    t = tunnel_figures(probes)
    assert (t["sent"], t["received"], t["lost"]) == (6, 4, 2)
    assert t["lost_at"] == [0.4, 0.6]
    assert (t["longest_gap_s"], t["longest_gap_from"]) == (0.6, 0.2)
    assert t["max_rtt_ms"] == 150.0
    check = check_tunnel(t)
    assert not check.ok and check.evidence == ["ping sent at 0.40s got no reply", "ping sent at 0.60s got no reply"]
    fine = tunnel_figures([(0.0, 0.01), (0.2, 0.3)])
    assert check_tunnel(fine).ok and fine["longest_gap_s"] == 0.2
    assert not check_tunnel(tunnel_figures([])).ok, "no ping sent proves nothing"


def _leftovers(out: str, pid: int) -> list[str]:
    """Processes, namespaces, links and WireGuard sockets of the run with this pid."""
    names = netlab.run(["ip", "netns", "list"]).stdout.split()
    links = netlab.run(["ip", "-o", "link", "show"]).stdout
    chaos_tag, lab_tag = f"{netlab.PREFIX}{pid % 10**7}x", f"{namespaces.LAB_PREFIX}{pid}x"
    wg_tags = (f"rba{pid % 100000}", f"rbb{pid % 100000}")
    left = [f"pid {p}" for p in _our_processes(out)]
    left += [n for n in names if n.startswith((chaos_tag, lab_tag))]
    left += [t for t in (chaos_tag, lab_tag) + wg_tags if t in links]
    left += [s for s in os.listdir("/var/run/wireguard") if s.startswith(wg_tags)] \
        if os.path.isdir("/var/run/wireguard") else []
    return left


@needs_agents
@pytest.mark.timeout(240)
def test_no_ping_is_lost_while_the_agents_replica_is_killed_paused_and_cut_off(tmp_path, capsys):
    out = tmp_path / "chaos"
    parser = argparse.ArgumentParser()
    chaos_run.add_arguments(parser)
    # seed 1: kill the leader (the agents' home) at 3 s, isolate r2, pause r3
    args = parser.parse_args(["--seed", "1", "--duration", "24", "--faults", "kill,pause,partition",
                              "--tunnels", "--out", str(out)])
    rc = chaos_run.main(args)
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    failed = {name for name, ok in summary["checks"].items() if not ok}
    # write gaps under this machine's load are tests/test_availability.py's business
    assert rc in (0, 1) and failed <= {"available"}, (out / "summary.txt").read_text()
    assert {"tunnel", "attributable", "linearizable", "converged"} <= set(summary["checks"])
    t = summary["tunnel"]
    assert t["lost"] == 0 and t["sent"] >= 24 / 0.2 * 0.9, t
    assert t["longest_gap_s"] < 1.0, t
    timeline = [json.loads(line) for line in (out / "faults.jsonl").read_text().splitlines()]
    assert timeline[0]["kind"] == "kill" and timeline[0]["target"] == t["home"], \
        "the first fault killed the replica the agents streamed from"
    logs = "".join(p.read_text() for p in (out / "tunnels").glob("agent-*.log"))
    assert f"stream from {t['home']} ended: error" in logs, "the agents lost their replica mid-run"
    assert "tunnel: " in printed and "[PASS] tunnel:" in printed
    assert not _leftovers(str(out), os.getpid())


@needs_agents
@pytest.mark.timeout(180)
def test_sigterm_mid_run_ends_agents_pinger_and_replicas_and_removes_namespaces(tmp_path):
    out = str(tmp_path / "chaos")
    proc = subprocess.Popen([sys.executable, "-m", "raftmesh.cli.main", "chaos", "run", "--seed", "1",
                             "--duration", "60", "--faults", "kill", "--tunnels", "--out", out],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        seen = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            seen.append(line)
            if "ops " in line and "tunnel agents 2/2 up" in line or not line:
                break
        assert "tunnel agents 2/2 up" in seen[-1], "".join(seen)
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=90)[0]
        assert proc.returncode != 0, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
    assert not _leftovers(out, proc.pid)
