"""Agents in chaos runs: protocol-exact light agents stream netmaps through every fault.

They register before the faults start, stream from their home replica, fail over like the
daemon when it dies, pauses or is cut off, and verify every frame's cluster signature.
After the run (healed, settled, quiet) two things must hold for every agent:

- it never applied a version older than one it had (its applied versions only increase),
  and it received no frame older than what it held (a replica that resumed it from the
  wrong place would show up here);
- it holds exactly the netmap every replica would stream to it now
  (`GET /api/v1/nodes/{id}/netmap` on each replica): the same peers, records and filter.
  Replicas must agree with each other too, which checks that netmaps are a deterministic
  function of the log (the replicated clock included).
"""
from __future__ import annotations

import json
import time

from .checkers import MAX_EVIDENCE, Check
from raftmesh.lab.light_agents import LightAgents, default_workers

AGENT_USER = "chaos-agents"


class ChaosAgents:
    def __init__(self, cluster, n: int, log_dir: str, log=print):
        self.cluster, self.n, self.log = cluster, n, log
        self.key_id: str | None = None  # setup objects the workload's checks must not flag
        self.machines: set[str] = set()
        self.swarm = LightAgents([r.api_url for r in cluster.replicas], default_workers(n),
                                 log_dir=log_dir)

    def start(self) -> None:
        """Register and connect; the workload's own allow-all policies give them peers."""
        self.key_id, key = preauth_key(self.cluster, AGENT_USER)
        self.machines = {n["machine_key"] for n in self.swarm.register(self.n, key, prefix="chaos-agent")}
        if not self.swarm.connect(timeout=60):
            raise RuntimeError("chaos agents did not all connect")
        self.log(f"{self.n} light agents streaming: {self.swarm.status()['by_replica']}")

    def status(self) -> str:
        s = self.swarm.status()
        return f"agents {s['connected']}/{s['agents']} streaming"

    def check(self, settle_timeout: float) -> list[Check]:
        quiet = self.swarm.settle(quiet=2.0, timeout=settle_timeout)
        snaps = self.swarm.netmaps()
        return [check_monotonic(snaps), self._check_converged(snaps, quiet)]

    def _check_converged(self, snaps: list[dict], quiet: bool) -> Check:
        ev = [] if quiet else [f"agents did not settle: {self.swarm.status()}"]
        agreed = 0
        for s in snaps:
            views = {}
            for r in self.cluster.replicas:
                status, body = self.cluster.request(
                    r, "GET", f"/api/v1/nodes/{s['node_id']}/netmap?stale=true", timeout=10)
                views[r.id] = body["netmap"] if status == 200 else f"HTTP {status}"
            distinct = {json.dumps(v, sort_keys=True) for v in views.values()}
            if len(distinct) != 1:
                ev.append(f"{s['node_id']}: replicas disagree: {_short(views)}")
                continue
            want = next(iter(views.values()))
            got = s["netmap"]
            if not isinstance(want, dict) or got is None:
                ev.append(f"{s['node_id']}: agent holds {_short(got)}, replicas say {_short(want)}")
            elif got["version"] > want["version"] or _content(got) != _content(want):
                ev.append(f"{s['node_id']} (on {s['replica']}, connected {s.get('connected')}, "
                          f"bye {s.get('bye')}, {s.get('reconnects')} reconnects, "
                          f"{s.get('errors')} errors): agent at version {got['version']} "
                          f"differs from the replicas' netmap at {want['version']}: "
                          f"{_difference(got, want)}")
            else:
                agreed += 1
        summary = f"{agreed}/{len(snaps)} agents hold the netmap every replica would stream now"
        return Check("agents converged", not ev, summary, ev[:MAX_EVIDENCE])

    def close(self) -> None:
        self.swarm.close()


def admin(cluster, method: str, path: str, body=None):
    """An admin request answered by any replica (faults may already be under way)."""
    deadline = time.monotonic() + 30
    while True:
        for r in cluster.replicas:
            try:
                status, answer = cluster.request(r, method, path, body, timeout=5)
            except OSError:
                continue
            if status < 500:
                return status, answer
        if time.monotonic() > deadline:
            raise RuntimeError(f"{method} {path} failed on every replica")
        time.sleep(0.2)


def preauth_key(cluster, user: str) -> tuple[str, str]:
    """Create `user` and a reusable pre-auth key for it: (key id, key)."""
    admin(cluster, "POST", "/api/v1/users", {"name": user})
    status, body = admin(cluster, "POST", "/api/v1/preauth-keys",
                         {"user": user, "reusable": True, "expiration_seconds": 86400})
    if status != 201:
        raise RuntimeError(f"cannot create {user}'s pre-auth key: {status} {body}")
    return body["preauth_key"]["id"], body["key"]


def check_monotonic(snaps: list[dict]) -> Check:
    """Applied versions only increase; no replica sent a frame older than the agent held."""
    ev = []
    for s in snaps:
        applied = s["applied"]
        back = [(a, b) for a, b in zip(applied, applied[1:]) if b < a]
        if back:
            ev.append(f"{s['node_id']}: applied version {back[0][1]} after {back[0][0]}")
        if s.get("stale_frames"):
            ev.append(f"{s['node_id']}: received {s['stale_frames']} frame(s) older than its netmap "
                      f"(first: {s.get('first_stale')})")
    n = sum(len(s["applied"]) for s in snaps)
    return Check("agents never went back", not ev,
                 f"{n} netmap versions applied by {len(snaps)} agents, all in order", ev[:MAX_EVIDENCE])


def _content(netmap: dict) -> dict:
    return {k: v for k, v in netmap.items() if k != "version"}


def _difference(got: dict, want: dict) -> str:
    gp = {p["id"]: p for p in got["peers"]}
    wp = {p["id"]: p for p in want["peers"]}
    parts = []
    if gp.keys() - wp.keys():
        parts.append(f"extra peers {sorted(gp.keys() - wp.keys())[:5]}")
    if wp.keys() - gp.keys():
        parts.append(f"missing peers {sorted(wp.keys() - gp.keys())[:5]}")
    changed = [k for k in gp.keys() & wp.keys() if gp[k] != wp[k]]
    if changed:
        k = changed[0]
        fields = sorted(f for f in wp[k] if gp[k].get(f) != wp[k][f])
        parts.append(f"{len(changed)} peer records differ (e.g. {k}: {fields})")
    if got["packet_filter"] != want["packet_filter"]:
        parts.append("packet filter differs")
    if got["self"] != want["self"]:
        parts.append("self differs")
    return "; ".join(parts) or "?"


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) < 200 else text[:200] + "..."
