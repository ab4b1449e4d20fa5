"""What every cluster benchmark does around its measurement, in one place: a scratch
directory, local replicas started and ready, the benchmark's users, keys and policy, light
agents or a namespace lab for real daemons, progress lines, and at the end every process
stopped, the directory removed (kept and named when the run failed) and the results
written. The benchmarks then differ only in what they measure.
"""
from __future__ import annotations

import contextlib
import json
import os
import time

from raftmesh.bench import report
from raftmesh.bench.workdir import WorkDir
from raftmesh.lab import namespaces
from raftmesh.lab.light_agents import LightAgents
from raftmesh.lab.local_cluster import LocalCluster

BENCH_USER, SVC_USER = "bench", "svc"


class BenchRun:
    """One run: `with BenchRun("revoke") as bench_run: ...`. Leaving the block ends the progress
    line and removes the work directory, or keeps it and names it when the block raised
    (Ctrl-C and SIGTERM included) or the benchmark set `failure` to say why."""

    def __init__(self, name: str):
        self.load_at_start = os.getloadavg()
        self.work = WorkDir(name)
        self.path = self.work.path
        self.progress = report.Progress(name)
        self.pids: list[int] = []  # every process started, so callers can check none is left
        self.failure = ""

    def __enter__(self) -> "BenchRun":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.progress.done()
        self.work.close(exc_type is None and not self.failure, self.failure)

    def machine(self) -> dict:
        return report.machine(self.load_at_start)

    @contextlib.contextmanager
    def cluster(self, replicas: int = 3, keepalive: float | None = None, subdir: str = "raftmesh",
                host: str = "127.0.0.1", extra_args: list[str] | None = None, **placement):
        """Replicas started and ready (durable journals, the default), stopped on exit.
        `placement`: LocalCluster's hosts, ports and command_prefix (the geo lab's namespaces)."""
        extra = ["--stream-keepalive", f"{keepalive:g}"] if keepalive is not None else []
        cluster = LocalCluster(os.path.join(self.path, subdir), replicas=replicas, host=host,
                               extra_args=extra + (extra_args or []), **placement)
        try:
            cluster.start_all()
            self.pids += [r.pid for r in cluster.replicas]
            cluster.wait_ready(timeout=60)
            yield cluster
        finally:
            cluster.stop_all()

    @contextlib.contextmanager
    def light_agents(self, cluster: LocalCluster, workers: int):
        """Light-agent worker processes homed on the cluster's replicas, closed on exit."""
        with LightAgents([r.api_url for r in cluster.replicas], workers, log_dir=self.path) as agents:
            self.pids += agents.pids
            yield agents


def connect_all(agents: LightAgents, n: int) -> None:
    """Open every registered agent's stream; an error with the swarm's status if one does not."""
    if not agents.connect(timeout=max(120.0, n / 20)):
        raise RuntimeError(f"not every agent got a netmap: {agents.status()}")


class LabUnavailable(Exception):
    """This machine cannot host real agent daemons; the message says what is missing."""


@contextlib.contextmanager
def namespace_lab():
    """A namespace lab for real `raftmesh agent up` daemons, torn down on exit (after the
    labs that dead runs left behind are removed)."""
    problems = namespaces.preflight()
    if problems:
        raise LabUnavailable("; ".join(problems))
    namespaces.cleanup_stale()
    with namespaces.Lab() as lab:
        yield lab


def add_agent_options(parser, workers: bool = True, register_concurrency: bool = True) -> None:
    """The options of the benchmarks that run agents."""
    parser.add_argument("--stream-keepalive", type=float, default=10.0,
                        help="the replicas' map-stream keepalive, seconds")
    if workers:
        parser.add_argument("--workers", type=int, default=0,
                            help="light-agent processes (default: one per 400 agents, <= CPUs+1)")
    if register_concurrency:
        parser.add_argument("--register-concurrency", type=int, default=64)


# -- the benchmark cluster's users, keys and policy -------------------------------------------
def policy_text(port: int, topology: str = "star", routes: tuple[str, ...] = ()) -> str:
    """The benchmark policy. Every `bench` agent's inbound filter has a rule from the
    `office` CIDR to its own addresses on `port`, so flipping `port` changes every agent's
    netmap (one small delta each) without giving agents peers. `svc` nodes (revoke victims)
    are reachable from every bench agent, so each of them is a peer of every agent.
    topology "mesh" also lets every bench agent reach every other (N-1 peers each). `routes`
    (subnets behind svc nodes) are reachable too: agents see only the routes they may use."""
    acls = [{"action": "accept", "src": ["office"], "dst": [f"{BENCH_USER}:{port}"], "proto": "tcp"},
            {"action": "accept", "src": [BENCH_USER], "dst": [f"{SVC_USER}:*"]}]
    if routes:
        acls.append({"action": "accept", "src": [BENCH_USER], "dst": [f"{r}:*" for r in routes]})
    if topology == "mesh":
        acls.append({"action": "accept", "src": [BENCH_USER], "dst": [f"{BENCH_USER}:*"]})
    elif topology != "star":
        raise ValueError(f"unknown topology {topology!r}")
    return json.dumps({"hosts": {"office": "192.0.2.0/24"}, "acls": acls})


def setup_cluster(cluster, topology: str = "star", port: int = 22,
                  routes: tuple[str, ...] = ()) -> dict[str, str]:
    """Users, one reusable pre-auth key per user, and the policy; returns {user: key}."""
    keys = {}
    for user in (BENCH_USER, SVC_USER):
        status, body = cluster.request(cluster.replicas[0], "POST", "/api/v1/users", {"name": user})
        if status != 201:
            raise RuntimeError(f"create user {user}: {status} {body}")
        status, body = cluster.request(cluster.replicas[0], "POST", "/api/v1/preauth-keys",
                                       {"user": user, "reusable": True})
        if status != 201:
            raise RuntimeError(f"pre-auth key for {user}: {status} {body}")
        keys[user] = body["key"]
    put_policy(cluster, port, topology, routes=routes)
    return keys


def put_policy(cluster, port: int, topology: str = "star", deadline: float = 30.0,
               routes: tuple[str, ...] = ()) -> dict:
    """PUT the policy (put_until_accepted)."""
    return put_until_accepted(cluster, "/api/v1/policy", policy_text(port, topology, routes),
                              deadline)


def put_until_accepted(cluster, path: str, body, deadline: float = 30.0) -> dict:
    """PUT `body` at `path` through any live replica (retrying while there is no leader);
    returns the version and the client-side times it was sent and acknowledged."""
    end = time.monotonic() + deadline
    while True:
        live = [r for r in cluster.replicas if r.alive()]
        for r in live:
            sent = time.time()
            try:
                status, answer = cluster.request(r, "PUT", path, body, timeout=10)
            except OSError:
                continue
            if status == 200:
                return {"version": answer["version"], "sent": sent, "acked": time.time(), "via": r.id}
        if time.monotonic() > end:
            raise TimeoutError(f"no replica accepted PUT {path}")
        time.sleep(0.05)
