"""A live data plane under chaos (`raftmesh chaos run --tunnels`).

Two real agents (`raftmesh agent up`: wireguard-go, nftables) in lab namespaces register
with a pre-auth key before the faults start, their tunnel comes up, and one pings the other
through it every 0.2 s for the whole run (lab/pinger.py). The data plane must never depend
on the control plane: whatever happens to the replicas, no probe may go unanswered.

The lab's hub sits on the chaos bridge with an address of the replicas' subnet, so agents
reach replicas directly; fault rules match only replica addresses, so no fault cuts the
agents off a replica that is up. Both agents list the leader at start first: faults aimed at
the leader (kill, pause, isolation) then hit the replica their streams come from.
Their user, key, nodes and first policy are setup, not workload: the checks leave out every
node that user registered and that key, and the policy carries no workload marker
(docs/chaos.md, 'Live tunnels').
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from raftmesh.lab.namespaces import Lab, RealAgent, cleanup_stale, rotated
from raftmesh.lab.processes import stop_proc

from .agent_checks import admin, preauth_key
from .checkers import MAX_EVIDENCE, Check

TUNNEL_USER = "chaos-tunnels"
# Before the workload's first policy (all of them allow everything): with no marker line it
# reads as "no policy" to the workload's checks (workload.policy_marker), as it is.
ALLOW_ALL = '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}\n'
INTERVAL = 0.2  # seconds between probes
LABELS = ("a", "b")


class ChaosTunnels:
    def __init__(self, cluster, net, workdir: str, log=print):
        self.cluster, self.net, self.workdir, self.log = cluster, net, workdir, log
        self.key_id: str | None = None
        self.lab: Lab | None = None
        self.agents: dict[str, RealAgent] = {}
        self.pinger: subprocess.Popen | None = None
        self.result_path = os.path.join(workdir, "tunnel-probes.json")
        self.peer_ip = ""
        self.home = ""  # the replica both agents stream from first (the leader at start)

    def start(self) -> None:
        """Agents up and a first reply through the tunnel, or RuntimeError (the run aborts)."""
        cleanup_stale()
        os.makedirs(self.workdir, exist_ok=True)
        self.lab = Lab()
        ns = {label: self.lab.add(label, f"192.0.2.{i + 1}/24") for i, label in enumerate(LABELS)}
        self.lab.join_bridge(self.net.bridge, f"{self.net.spare_addresses(1)[0]}/{self.net.subnet.prefixlen}")
        self.key_id, key = preauth_key(self.cluster, TUNNEL_USER)
        status, body = admin(self.cluster, "PUT", "/api/v1/policy", ALLOW_ALL)
        if status != 200:
            raise RuntimeError(f"cannot set the tunnels' allow-all policy: {status} {body}")
        urls = [r.api_url for r in self.cluster.replicas]
        leader = self.cluster.leader(timeout=30)
        self.home, home = leader.id, self.cluster.replicas.index(leader)
        for label in LABELS:
            agent = RealAgent(self.lab, ns[label], self.workdir, rotated(urls, home), key, label)
            agent.start()
            self.agents[label] = agent
        addresses = {label: self._wait_connected(agent) for label, agent in self.agents.items()}
        self.peer_ip = addresses["b"]
        self.pinger = ns["a"].spawn(sys.executable, "-m", "raftmesh.lab.pinger", self.peer_ip,
                                    self.result_path, "--interval", str(INTERVAL),
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if self.pinger.stdout.readline().strip() != "ready":
            raise RuntimeError("the tunnel pinger did not start")
        self._wait_first_reply(ns["a"])
        self.log(f"tunnels: agents a {addresses['a']} and b {addresses['b']} home on "
                 f"{self.cluster.replicas[home].id} (the leader); a pings b every {INTERVAL:g}s")

    def _wait_connected(self, agent: RealAgent) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            s = agent.status()
            if s.get("state") == "connected" and s.get("addresses"):
                return s["addresses"][0].split("/")[0]
            if agent.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"tunnel agent {agent.label} did not connect: {agent.log_tail()[-600:]}")

    def _wait_first_reply(self, ns) -> None:
        """Peers are configured a little after `connected`: wait for one answered ping
        (a separate prober, so the recorded probes all come after the tunnel was up)."""
        prober = ns.first_reply(self.peer_ip, interval=0.1, wait=0.5, timeout=30)
        if prober.wait(40) != 0:
            raise RuntimeError("no ping crossed the tunnel within 30 s")

    def status(self) -> str:
        up = sum(a.proc is not None and a.proc.poll() is None for a in self.agents.values())
        return f"tunnel agents {up}/{len(self.agents)} up"

    def check(self, t0: float) -> tuple[Check, dict]:
        """Stop the pinger (it waits for late replies) and judge its probes."""
        if self.pinger is None:
            return Check("tunnel", False, "the pinger never started"), {}
        self.pinger.terminate()
        try:
            self.pinger.wait(15)
        except subprocess.TimeoutExpired:
            stop_proc(self.pinger, timeout=5)
        try:
            with open(self.result_path) as f:
                probes = json.load(f)["probes"]
        except (OSError, ValueError, KeyError) as e:
            return Check("tunnel", False, f"the pinger left no result: {e!r}"), {}
        figures = tunnel_figures([(s - t0, None if r is None else r - t0) for s, r in probes])
        return check_tunnel(figures), dict(figures, home=self.home)

    def close(self) -> None:
        """Agents, pinger and lab gone (idempotent). The run closes them before it settles:
        running agents keep writing (reports, stream moves), and a write in flight while the
        replicas stop leaves their states a few entries apart."""
        for agent in self.agents.values():
            try:
                agent.stop()
            except Exception as e:  # the lab still ends it by pid below
                self.log(f"stopping tunnel agent {agent.label}: {e!r}")
        self.agents.clear()
        if self.lab is not None:
            self.lab.close()
            self.lab = None


def tunnel_figures(probes: list[tuple[float, float | None]]) -> dict:
    """Probes (send time, reply time or None, seconds on the run's timeline) -> what the
    check and the summary report: counts, lost probes' send times, and the longest time
    between two answered probes (INTERVAL when nothing was lost or late)."""
    answered = [s for s, r in probes if r is not None]
    gap, at = 0.0, None
    for a, b in zip(answered, answered[1:]):
        if b - a > gap:
            gap, at = b - a, a
    rtts = sorted(r - s for s, r in probes if r is not None)
    return {"sent": len(probes), "received": len(answered),
            "lost": len(probes) - len(answered),
            "lost_at": [round(s, 2) for s, r in probes if r is None],
            "longest_gap_s": round(gap, 2), "longest_gap_from": None if at is None else round(at, 2),
            "max_rtt_ms": round(rtts[-1] * 1000, 1) if rtts else None,
            "first": round(probes[0][0], 2) if probes else None,
            "last": round(probes[-1][0], 2) if probes else None}


def check_tunnel(t: dict) -> Check:
    """Fails on any lost probe: the tunnel must not notice the control plane's faults."""
    summary = (f"{t['sent']} pings through the tunnel, {t['lost']} lost, longest gap "
               f"{t['longest_gap_s']:.2f}s, max rtt {t['max_rtt_ms']} ms")
    ev = [f"ping sent at {s:.2f}s got no reply" for s in t["lost_at"][:MAX_EVIDENCE]]
    if not t["sent"]:
        ev.append("no ping was sent")
    return Check("tunnel", not ev, summary, ev)
