"""/healthz, /readyz and /metrics: what load balancers and Prometheus poll.

/readyz is what HAProxy uses to spread traffic: a replica is ready when it sees a quorum,
knows a leader and has applied close to the leader's commit index, so a request sent to it
is served promptly rather than stalling on a lagging or isolated replica.
"""
from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from raftmesh.cluster.raft import Raft

from . import process_metrics
from .map_stream import HUB

REGISTRY = web.AppKey("registry", object)  # the replica's Prometheus registry
RAFT_STATE_VALUE = {"follower": 0, "candidate": 1, "leader": 2}


def readiness(replica: Raft, policy_problem: str | None = None) -> tuple[bool, str]:
    """`policy_problem`: why this replica's netmaps do not follow the newest stored policy
    (cluster/netmap_feed.py); such a replica serves stale netmaps, so it takes no traffic."""
    s = replica.status
    if not s:
        return False, "raft not started"
    if not s["has_quorum"]:
        return False, "no quorum"
    if s["leader"] is None:
        return False, "no leader"
    leader_commit = s["commit_index"] if s["state"] == "leader" else (s["leader_commit_index"] or 0)
    lag = leader_commit - s["applied_index"]
    if lag > replica.config.ready_max_lag:
        return False, f"applied index trails the leader's commit index by {lag}"
    if policy_problem:
        return False, policy_problem
    return True, "ready"


def serving_readiness(app: web.Application, replica: Raft) -> tuple[bool, str]:
    """What /readyz answers: readiness() with the netmap feed's policy problem."""
    feed = app[HUB].feed
    return readiness(replica, feed.policy_problem if feed else None)


class RaftCollector:
    """Reads the replica's status copy at scrape time."""

    def __init__(self, replica: Raft):
        self.replica = replica

    def collect(self):
        s, r = self.replica.status, self.replica
        if not s:
            return
        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            return g
        yield gauge("raftmesh_raft_state", "0 follower, 1 candidate, 2 leader",
                    RAFT_STATE_VALUE.get(s["state"], -1))
        yield gauge("raftmesh_raft_is_leader", "1 if this replica is the leader", s["state"] == "leader")
        yield gauge("raftmesh_raft_term", "current Raft term", s["term"])
        yield gauge("raftmesh_raft_commit_index", "Raft commit index", s["commit_index"])
        yield gauge("raftmesh_raft_applied_index", "last applied Raft index", s["applied_index"])
        leader_commit = s["commit_index"] if s["state"] == "leader" else (s["leader_commit_index"] or 0)
        yield gauge("raftmesh_raft_apply_lag", "leader commit index minus applied index",
                    max(0, leader_commit - s["applied_index"]))
        yield gauge("raftmesh_raft_has_quorum", "1 if a quorum is reachable", s["has_quorum"])
        yield gauge("raftmesh_raft_members", "Raft members", len(s["members"]))
        yield gauge("raftmesh_raft_log_entries", "entries in the local Raft journal", s["log_entries"])
        yield gauge("raftmesh_raft_leader_known", "1 if a leader is known", s["leader"] is not None)
        c = CounterMetricFamily("raftmesh_journal_fsyncs", "journal fsync calls")
        c.add_metric([], s["journal_syncs"])
        yield c
        c = CounterMetricFamily("raftmesh_snapshots", "snapshots written")
        c.add_metric([], r.stats["snapshots"])
        yield c
        c = CounterMetricFamily("raftmesh_snapshot_seconds", "time spent writing snapshots")
        c.add_metric([], r.stats["snapshot_seconds"])
        yield c
        c = CounterMetricFamily("raftmesh_snapshot_installs", "snapshots loaded (start-up or from leader)")
        c.add_metric([], r.stats["snapshot_installs"])
        yield c
        c = CounterMetricFamily("raftmesh_raft_slow_ticks",
                                "Raft ticks longer than half the shortest election timeout")
        c.add_metric([], r.stats["slow_ticks"])
        yield c


class Metrics:
    def __init__(self, replica: Raft):
        self.registry = CollectorRegistry()
        self.registry.register(RaftCollector(replica))
        self.gc_pauses = process_metrics.register(self.registry)
        self.request_seconds = Histogram(
            "raftmesh_api_request_seconds", "API request latency by route and status",
            ["method", "route", "status"], registry=self.registry,
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))

        self._request_children: dict[tuple, Any] = {}

    def observe_request(self, request: web.Request, status: int, seconds: float) -> None:
        """Into raftmesh_api_request_seconds by method, route and status. Each labelled child
        is looked up once per label set: prometheus_client's labels() (validation, a lock,
        str conversions) on every request showed up in write profiles."""
        resource = request.match_info.route.resource
        key = (request.method, resource.canonical if resource is not None else "unmatched", status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.request_seconds.labels(
                key[0], key[1], str(status))
        child.observe(seconds)

    def close(self) -> None:
        """Stops the GC pause timing (a process-wide gc callback) with the app."""
        self.gc_pauses.close()


class ReadinessCollector:
    """/readyz as a gauge, so an alert can say which replica takes no traffic and why not
    only that it is down (deploy/monitoring)."""

    def __init__(self, app: web.Application, replica: Raft):
        self.app, self.replica = app, replica

    def describe(self):
        return []

    def collect(self):
        g = GaugeMetricFamily("raftmesh_replica_ready", "1 when /readyz answers 200 (quorum, "
                              "leader known, applied close to the leader's commit, policy readable)")
        g.add_metric([], serving_readiness(self.app, self.replica)[0])
        yield g


def add_routes(app: web.Application, replica: Raft, metrics: Metrics) -> None:
    app[REGISTRY] = metrics.registry
    metrics.registry.register(ReadinessCollector(app, replica))

    async def healthz(request):
        return web.json_response({"status": "alive", "id": replica.config.id})

    async def readyz(request):
        ready, reason = serving_readiness(request.app, replica)
        return web.json_response({"ready": ready, "reason": reason}, status=200 if ready else 503)

    async def metrics_route(request):
        return web.Response(body=generate_latest(metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_route)

    async def close_metrics(app):
        metrics.close()
    app.on_cleanup.append(close_metrics)
