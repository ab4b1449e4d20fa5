"""End to end: 3 replica processes, 3 `raftmesh agent up` daemons, each agent in its own
network namespace with real wireguard-go and nftables, traffic checked on the wire.

Replicas listen on the host end of a veth into the lab (tests/netns.py connect_host);
agents reach them through the lab's hub namespace. Every process is ended by pid and the
lab's namespaces are deleted, on failure too.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from netns import Lab, cleanup_stale, stop_proc, wait_for

from raftmesh.lab.local_cluster import LocalCluster

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces"),
    pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="wireguard-go not installed"),
    pytest.mark.timeout(240),
]

P1 = {"acls": [
    {"action": "accept", "src": ["alice"], "dst": ["bob:8080"]},
    {"action": "accept", "src": ["alice", "bob"], "dst": ["alice:*", "bob:*"], "proto": "icmp"},
]}
# policy 2: alice may use 9090 instead of 8080, and carol may ping bob
P2 = {"acls": [
    {"action": "accept", "src": ["alice"], "dst": ["bob:9090"]},
    {"action": "accept", "src": ["alice", "bob"], "dst": ["alice:*", "bob:*"], "proto": "icmp"},
    {"action": "accept", "src": ["carol"], "dst": ["bob:*"], "proto": "icmp"},
]}


class Mesh:
    def __init__(self, tmp_path):
        cleanup_stale()
        self.tmp = tmp_path
        self.lab = Lab()
        self.agents: dict[str, subprocess.Popen] = {}
        self.cluster: LocalCluster | None = None
        try:
            self.ns = {label: self.lab.add(label, f"192.0.2.{i + 1}/24")
                       for i, label in enumerate(("a", "b", "c"))}
            host = self.lab.connect_host()
            self.cluster = LocalCluster(str(tmp_path / "cluster"), replicas=3, host=host,
                                        extra_args=["--stream-keepalive", "2"])
            self.cluster.start_all()
            self.cluster.wait_ready(timeout=30)
            self.keys = {}
            for user in ("alice", "bob", "carol"):
                assert self.admin("POST", "/api/v1/users", {"name": user})[0] == 201
                self.keys[user] = self.admin("POST", "/api/v1/preauth-keys",
                                             {"user": user, "reusable": True})[1]["key"]
            self.set_policy(P1)
            self.ifnames = {label: self.lab.ifname(label) for label in self.ns}
            self.users = {"a": "alice", "b": "bob", "c": "carol"}
            for label in self.ns:
                self.start_agent(label)
            for label in self.ns:
                wait_for(lambda l=label: self.status(l).get("state") == "connected"
                         and self.status(l).get("addresses"), timeout=30,
                         what=f"agent {label} connected")
            self.ids = {label: self.status(label)["node_id"] for label in self.ns}
            self.ips = {label: self.status(label)["addresses"][0].split("/")[0] for label in self.ns}
        except BaseException:
            self.close()
            raise

    def admin(self, method, path, body=None):
        live = [r for r in self.cluster.replicas if r.alive()]
        return self.cluster.request(live[0], method, path, body)

    def set_policy(self, policy: dict) -> int:
        status, body = self.admin("PUT", "/api/v1/policy", json.dumps(policy))
        assert status == 200, body
        return body["version"]

    def start_agent(self, label: str) -> subprocess.Popen:
        ns = self.ns[label]
        log = open(self.tmp / f"agent-{label}.log", "ab")
        servers = ",".join(r.api_url for r in self.cluster.replicas)
        proc = ns.spawn(sys.executable, "-m", "raftmesh.cli.main", "agent", "up",
                        "--server", servers, "--state-dir", str(self.tmp / f"state-{label}"),
                        "--interface", self.ifnames[label], "--hostname", f"host-{label}",
                        "--endpoint", f"{ns.ip}:41641", "--log-level", "DEBUG",
                        stdout=log, stderr=subprocess.STDOUT,
                        env=dict(os.environ, RAFTMESH_AUTH_KEY=self.keys[self.users[label]]))
        log.close()
        self.agents[label] = proc
        return proc

    def stop_agent(self, label: str) -> None:
        stop_proc(self.agents.pop(label), timeout=10)

    def status(self, label: str) -> dict:
        try:
            with open(self.tmp / f"state-{label}" / "status.json") as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return {}

    def wg_peer_keys(self, label: str) -> set[str]:
        out = self.ns[label].run("wg", "show", self.ifnames[label], "peers").stdout
        return set(out.split())

    def node_key(self, label: str) -> str:
        return self.admin("GET", f"/api/v1/nodes/{self.ids[label]}")[1]["node"]["node_key"]

    def tcp(self, src: str, dst: str, port: int) -> str:
        return self.ns[src].tcp_connect(self.ips[dst], port, timeout=1.0)

    def close(self) -> None:
        for label in list(self.agents):
            try:
                self.stop_agent(label)
            except Exception:
                pass
        if self.cluster is not None:
            self.cluster.stop_all()
        self.lab.close()

    def log_tail(self, label: str) -> str:
        try:
            return (self.tmp / f"agent-{label}.log").read_text()[-3000:]
        except FileNotFoundError:
            return ""


@pytest.fixture
def mesh(tmp_path):
    m = Mesh(tmp_path)
    try:
        yield m
    finally:
        m.close()


def test_policy_on_the_wire_change_and_revocation(mesh):
    """Tests 1-3: allowed ping/TCP, denied peer and port; a policy change; a revocation."""
    m = mesh
    for label in ("a", "b"):
        m.ns[label].tcp_server(8080)
        m.ns[label].tcp_server(9090)
    # 1. A and B talk on 8080 and ping; 9090 is dropped; C is not anyone's peer
    wait_for(lambda: m.ns["a"].ping(m.ips["b"]), timeout=20, what="a pings b")
    assert m.ns["b"].ping(m.ips["a"])
    assert m.tcp("a", "b", 8080) == "ok"
    assert m.tcp("a", "b", 9090) == "timeout", "denied port must be dropped, not refused"
    assert m.tcp("b", "a", 8080) == "timeout", "the ACL is one-way"
    assert m.wg_peer_keys("c") == set()
    assert m.node_key("c") not in m.wg_peer_keys("a") | m.wg_peer_keys("b")
    # a C that ignores its netmap and configures B as a peer still cannot get through:
    # B has no WireGuard peer for C's key, so its packets are dropped
    b_key = m.node_key("b")
    m.ns["c"].run("wg", "set", m.ifnames["c"], "peer", b_key, "endpoint", f"{m.ns['b'].ip}:41641",
                  "allowed-ips", f"{m.ips['b']}/32")
    m.ns["c"].run("ip", "route", "replace", f"{m.ips['b']}/32", "dev", m.ifnames["c"])
    assert not m.ns["c"].ping(m.ips["b"])

    # 2. a policy change reaches all agents and takes effect on the wire
    m.set_policy(P2)
    wait_for(lambda: m.tcp("a", "b", 9090) == "ok", timeout=15, what="9090 opens")
    assert m.tcp("a", "b", 8080) == "timeout"
    wait_for(lambda: m.ns["c"].ping(m.ips["b"]), timeout=15, what="carol may ping bob")
    assert m.node_key("c") in m.wg_peer_keys("b")
    # the daemons ack it (tagged under their streams' keys, from their ack threads)
    def acked(label: str) -> bool:
        stream = m.admin("GET", f"/api/v1/nodes/{m.ids[label]}")[1]["node"]["stream"] or {}
        return stream.get("acked_version") is not None and stream["acked_version"] == stream["sent_version"]
    wait_for(lambda: acked("a") and acked("b"), timeout=15, what="the policy change acked")
    # as datagrams to the replicas' STUN ports (protocol version 3), which confirmed them
    taken = [line for r in m.cluster.replicas for line in m.cluster.request(r, "GET", "/metrics")[1].splitlines()
             if line.startswith('raftmesh_ack_datagrams_total{outcome="taken"}')]
    assert sum(float(line.split()[-1]) for line in taken) >= 2

    # 3. revoking C removes it from every peer's WireGuard config and its traffic stops
    c_key = m.node_key("c")
    assert m.admin("DELETE", f"/api/v1/nodes/{m.ids['c']}")[0] == 200
    wait_for(lambda: c_key not in m.wg_peer_keys("b") and c_key not in m.wg_peer_keys("a"),
             timeout=10, what="c removed from peers")
    assert not m.ns["c"].ping(m.ips["b"])
    wait_for(lambda: m.status("c").get("state") in ("revoked", "deleted"), timeout=10,
             what="agent c knows it was revoked")
    assert m.ns["a"].ping(m.ips["b"]), "other tunnels are untouched"


def test_failover_and_full_outage(mesh):
    """Tests 4-5: the agent's replica is killed; then every replica is killed."""
    m = mesh
    m.ns["b"].tcp_server(8080)
    m.ns["b"].tcp_server(9090)
    wait_for(lambda: m.ns["a"].ping(m.ips["b"]), timeout=20, what="a pings b")
    # 4. kill the replica agent A streams from: it fails over and later changes arrive
    serving = m.status("a")["replica"]
    victim = next(r for r in m.cluster.replicas if r.id == serving)
    m.cluster.kill(victim)
    wait_for(lambda: m.status("a").get("state") == "connected" and m.status("a")["replica"] != serving,
             timeout=15, what="agent a failed over")
    wait_for(lambda: m.cluster.leader(timeout=5) is not None, timeout=15)
    version = m.set_policy(P2)
    wait_for(lambda: m.status("a")["version"] >= version, timeout=15, what="a gets the change")
    wait_for(lambda: m.tcp("a", "b", 9090) == "ok", timeout=15, what="change after failover")
    m.cluster.start(victim)
    m.cluster.wait_ready(timeout=30)

    # 5. kill every replica: tunnels keep passing traffic
    trace_file = open(m.tmp / "ping-trace", "w")
    pinger = m.ns["a"].pinger(m.ips["b"], interval=0.1, out=trace_file)
    trace_file.close()
    for r in m.cluster.replicas:
        m.cluster.kill(r)
    wait_for(lambda: m.status("a").get("state") == "disconnected", timeout=15,
             what="agent a notices the outage")
    assert m.tcp("a", "b", 9090) == "ok"
    wait_for(lambda: len((m.tmp / "ping-trace").read_text()) >= 40, timeout=20,
             what="4 s of pings during the outage")
    stop_proc(pinger)
    trace = (m.tmp / "ping-trace").read_text()
    assert len(trace) >= 10 and "x" not in trace[2:], f"traffic interrupted during outage: {trace}"
    # restarting an agent during the outage brings its tunnels back from the cache
    m.stop_agent("a")
    assert not m.ns["a"].ping(m.ips["b"], timeout=0.5), "the tunnel is down with the agent"
    m.start_agent("a")
    wait_for(lambda: m.ns["a"].ping(m.ips["b"]), timeout=20, what="tunnel back from cache")
    assert m.tcp("a", "b", 9090) == "ok" and m.tcp("a", "b", 8080) == "timeout"
    wait_for(lambda: m.status("a")["state"] == "disconnected", timeout=15, what="a stays offline")
    # replicas return: changes flow again
    for r in m.cluster.replicas:
        m.cluster.start(r)
    m.cluster.wait_ready(timeout=30)
    version = m.set_policy(P1)
    wait_for(lambda: m.tcp("a", "b", 8080) == "ok", timeout=20, what="changes flow again")
    # (b enforces that one; a itself may still be in its backoff, capped at 10 s)
    wait_for(lambda: m.status("a").get("state") == "connected" and m.status("a")["version"] >= version,
             timeout=30, what="a streams the new policy")


def test_key_rotation_status_sigkill_restart_and_logout(mesh):
    """The rest of the daemon: WireGuard key rotation keeps tunnels, `agent status`, a
    SIGKILLed agent's orphaned wireguard-go is ended on restart, and a clean logout."""
    m = mesh
    wait_for(lambda: m.ns["a"].ping(m.ips["b"]), timeout=20, what="a pings b")
    old_key = m.node_key("a")
    state_a = str(m.tmp / "state-a")
    m.ns["a"].run(sys.executable, "-m", "raftmesh.cli.main", "agent", "rotate-key",
                  "--state-dir", state_a)
    wait_for(lambda: m.node_key("a") != old_key, timeout=15, what="node key rotated")
    new_key = m.node_key("a")
    wait_for(lambda: new_key in m.wg_peer_keys("b") and old_key not in m.wg_peer_keys("b"),
             timeout=15, what="b learns a's new key")
    wait_for(lambda: m.ns["a"].ping(m.ips["b"]), timeout=15, what="tunnel on the new key")

    out = m.ns["a"].run(sys.executable, "-m", "raftmesh.cli.main", "agent", "status",
                        "--state-dir", state_a, "--json").stdout
    st = json.loads(out)
    assert st["running"] and st["state"] == "connected" and st["replica"] in {
        r.id for r in m.cluster.replicas}
    peer_b = next(p for p in st["peers"] if p["name"] == "host-b")
    assert peer_b["last_handshake"] is not None
    text = m.ns["a"].run(sys.executable, "-m", "raftmesh.cli.main", "agent", "status",
                         "--state-dir", state_a).stdout
    assert "host-b" in text and "handshake" in text

    # SIGKILL leaves wireguard-go running; the next start ends it by pid and takes over
    proc = m.agents.pop("a")
    wg_pid = json.load(open(os.path.join(state_a, "wireguard-go.pid")))["pid"]
    proc.kill()
    proc.wait(10)
    assert os.path.exists(f"/proc/{wg_pid}"), "wireguard-go outlives a SIGKILLed agent"
    m.start_agent("a")
    wait_for(lambda: not os.path.exists(f"/proc/{wg_pid}"), timeout=15, what="orphan ended")
    wait_for(lambda: m.status("a").get("state") == "connected" and m.ns["a"].ping(m.ips["b"]),
             timeout=20, what="a back after SIGKILL")

    # logout: node key expired, daemon stopped and its interface gone, peers drop it
    servers = ",".join(r.api_url for r in m.cluster.replicas)
    m.ns["a"].run(sys.executable, "-m", "raftmesh.cli.main", "agent", "logout",
                  "--state-dir", state_a, "--server", servers)
    wait_for(lambda: m.agents["a"].poll() is not None, timeout=15, what="daemon exits")
    node = m.admin("GET", f"/api/v1/nodes/{m.ids['a']}")[1]["node"]
    assert node["expired"] and not os.path.exists(os.path.join(state_a, "netmap.json"))
    assert m.ns["a"].run("ip", "link", "show", m.ifnames["a"], check=False).returncode != 0
    wait_for(lambda: new_key not in m.wg_peer_keys("b"), timeout=10, what="b drops a")
