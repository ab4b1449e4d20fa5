"""Real HAProxy (deploy/haproxy/haproxy.cfg, rendered for the test's ports) in front of real
replica processes: writes through the load balancer survive a SIGKILLed leader, the dead
replica is marked DOWN, and a replica without a quorum is taken out of rotation."""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass

import pytest

from conftest import wait_until
from raftmesh.cluster.config import ReplicaConfig
from raftmesh.lab.local_cluster import free_ports
from raftmesh.proto.routes import LOGOUT

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TEMPLATE = os.path.join(ROOT, "deploy", "haproxy", "haproxy.cfg")
EXAMPLE_TOML = os.path.join(ROOT, "deploy", "examples", "replica.toml")
HAPROXY = "/usr/sbin/haproxy"
BACKEND = "raftmesh_api"


def render(template: str, values: dict[str, str]) -> str:
    """Substitute the template's ${RAFTMESH_...} placeholders; every one must be given."""
    missing = sorted(set(re.findall(r"\$\{(\w+)\}", template)) - set(values))
    if missing:
        raise KeyError(f"no value for placeholders {missing}")
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], template)


def _short_tmpdir(tmp_path) -> str:
    """A directory for the stats socket: unix socket paths must stay under 108 bytes."""
    return str(tmp_path) if len(str(tmp_path)) < 80 else tempfile.mkdtemp(prefix="rmlb-")


def haproxy_stat_rows(sock_path: str) -> list[dict[str, str]]:
    """HAProxy's "show stat" CSV from the runtime API socket, one dict per row."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(sock_path)
        s.sendall(b"show stat\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    lines = b"".join(chunks).decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    return [dict(zip(header, line.split(","))) for line in lines[1:] if line]


def _stat_or_empty(sock_path: str, backend: str = BACKEND) -> dict[str, str]:
    """{server name: status} of one backend; {} while the socket does not answer."""
    try:
        rows = haproxy_stat_rows(sock_path)
    except OSError:
        return {}
    return {r["svname"]: r["status"] for r in rows
            if r["pxname"] == backend and r["svname"] not in ("FRONTEND", "BACKEND")}


@dataclass
class LB:
    cluster: object
    url: str
    sock: str
    log: str


@pytest.fixture
def lb(make_cluster, tmp_path):
    """A ready 3-replica cluster behind a real HAProxy started from the rendered template."""
    if not os.path.exists(HAPROXY):
        pytest.skip("haproxy is not installed (deploy/install.sh installs it)")
    c = make_cluster(3)
    assert [r.id for r in c.replicas] == ["r1", "r2", "r3"]  # server names in the template
    lb_port, stats_port = free_ports(2)
    sock_dir = _short_tmpdir(tmp_path)
    sock = os.path.join(sock_dir, "haproxy.sock")
    cfg = tmp_path / "haproxy.cfg"
    with open(TEMPLATE) as f:
        cfg.write_text(render(f.read(), {
            "RAFTMESH_LB_BIND": f"127.0.0.1:{lb_port}", "RAFTMESH_LB_STATS": f"127.0.0.1:{stats_port}",
            "RAFTMESH_LB_SOCKET": sock,
            **{f"RAFTMESH_R{i + 1}": r.api_url.removeprefix("http://") for i, r in enumerate(c.replicas)}}))
    log_path = str(tmp_path / "haproxy.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{lb_port}"

        def up():
            assert proc.poll() is None, f"haproxy exited with {proc.returncode}; see {log_path}"
            if set(_stat_or_empty(sock).values()) != {"UP"}:
                return False
            try:
                return c.request(url, "GET", "/readyz", timeout=1)[0] == 200
            except (OSError, http.client.HTTPException):
                return False
        wait_until(up, 60, what="HAProxy to mark all replicas UP and answer through its frontend")
        yield LB(c, url, sock, log_path)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, 15)  # SIGTERM by pid: haproxy -db stops at once
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, 9)
                proc.wait(timeout=5)
        if sock_dir != str(tmp_path):
            shutil.rmtree(sock_dir, ignore_errors=True)


# -- a client that retries writes safely ------------------------------------------------------
RETRYABLE_CODES = {"no_leader", "outcome_unknown"}


def attempt_write(c, url: str, name: str, key: str) -> tuple[str, dict | None]:
    """One POST /users attempt: ("acked", body), ("retry:<why>", None) or ("unexpected:...", None).

    Retrying with the same Idempotency-Key is safe on every retry reason: no_leader (not
    applied), outcome_unknown, HAProxy's 502/504 (the replica died or hung with the request)
    and HAProxy's 503 (no server ready), and a connection error between us and HAProxy."""
    try:
        status, body = c.request(url, "POST", "/api/v1/users", {"name": name}, timeout=8,
                                 headers={"Idempotency-Key": key})
    except (OSError, http.client.HTTPException) as e:
        return f"retry:{type(e).__name__}", None
    if status == 201 and isinstance(body, dict) and body.get("user", {}).get("name") == name:
        return "acked", body
    if isinstance(body, dict) and status == 503 and body.get("error", {}).get("code") in RETRYABLE_CODES:
        return f"retry:{body['error']['code']}", None
    if not isinstance(body, dict) and status in (502, 503, 504):
        return f"retry:haproxy_{status}", None  # HAProxy's own error page
    return f"unexpected:{status} {str(body)[:300]}", None


def write_until_definite(c, url, name, key, deadline, attempts: list, abort: threading.Event):
    """Retry one write (same key) until acknowledged, refused or the deadline: (outcome, body)."""
    while True:
        sent = time.monotonic()
        outcome, body = attempt_write(c, url, name, key)
        attempts.append((sent, time.monotonic(), outcome))
        if not outcome.startswith("retry:"):
            return outcome, body
        if time.monotonic() > deadline or abort.is_set():
            return "abandoned", None
        abort.wait(0.02)  # pacing between retries, not synchronisation


@dataclass
class Ack:
    name: str
    key: str
    version: int
    first_sent: float
    acked_at: float


class Writer(threading.Thread):
    """Creates users through HAProxy one after another, each retried until definite."""

    def __init__(self, c, url: str, max_writes: int = 1500, write_deadline: float = 20.0):
        super().__init__(name="lb-writer", daemon=True)
        self.c, self.url, self.max_writes, self.write_deadline = c, url, max_writes, write_deadline
        self.acks: list[Ack] = []
        self.attempts: list[tuple[float, float, str]] = []
        self.problems: list[str] = []
        self.stop, self.abort = threading.Event(), threading.Event()

    def run(self):
        prefix = uuid.uuid4().hex[:6]
        try:
            # On stop no new write starts, but the one in progress runs to a definite answer.
            for i in range(self.max_writes):
                if self.stop.is_set():
                    break
                name, key = f"lb-{prefix}-{i}", f"test-haproxy-{prefix}-{i}"
                first = time.monotonic()
                outcome, body = write_until_definite(self.c, self.url, name, key,
                                                     first + self.write_deadline, self.attempts,
                                                     self.abort)
                if outcome != "acked":
                    self.problems.append(f"{name}: {outcome}")
                    return
                self.acks.append(Ack(name, key, body["version"], first, time.monotonic()))
        except BaseException as e:  # surfaced by healthy() in the test thread
            self.problems.append(f"writer crashed: {e!r}")

    def healthy(self) -> bool:
        assert not self.problems, self.problems
        return True


@pytest.mark.timeout(60)
def test_writes_through_haproxy_survive_leader_kill(lb):
    c, url = lb.cluster, lb.url
    w = Writer(c, url)
    w.start()
    samples: list[tuple[float, dict]] = []  # HAProxy's view while the leader dies
    try:
        wait_until(lambda: w.healthy() and len(w.acks) >= 20, 20,
                   what="writes through HAProxy before the kill")
        leader = c.leader()
        roles = {r.id: c.request(r, "GET", "/api/v1/cluster/self", timeout=2)[1]["replica"]["state"]
                 for r in c.replicas}
        assert roles[leader.id] == "leader" and list(roles.values()).count("leader") == 1, roles
        killed_at = time.monotonic()
        c.kill(leader)  # SIGKILL, then reaped

        def dead_leader_down():
            w.healthy()
            status = _stat_or_empty(lb.sock)
            samples.append((time.monotonic(), status))
            return status.get(leader.id, "").startswith("DOWN") and time.monotonic()
        down_at = wait_until(dead_leader_down, 10, interval=0.02,
                             what="HAProxy to mark the killed leader DOWN")

        def enough_after_kill():
            w.healthy()
            samples.append((time.monotonic(), _stat_or_empty(lb.sock)))
            return (sum(1 for a in w.acks if a.acked_at > killed_at) >= 20
                    and time.monotonic() - killed_at >= 3)
        wait_until(enough_after_kill, 25, interval=0.05, what="writes through HAProxy after the kill")
    finally:
        w.stop.set()
        w.join(30)
        if w.is_alive():
            w.abort.set()
            w.join(10)
    assert not w.is_alive(), "the writer did not finish its last write"
    w.healthy()

    after = [a for a in w.acks if a.acked_at > killed_at]
    before = [a for a in w.acks if a.acked_at <= killed_at]
    assert len(before) >= 20 and len(after) >= 20
    # The gap: from the kill to the first acknowledgement of a write begun after the kill (a
    # write in flight at the kill may still be acknowledged at once, if the dead leader had
    # replicated it). The outage: the longest pause between consecutive acknowledgements.
    gap = next(a.acked_at for a in w.acks if a.first_sent > killed_at) - killed_at
    outage = max(b.acked_at - a.acked_at for a, b in zip(w.acks, w.acks[1:]) if b.acked_at > killed_at)
    outcomes: dict[str, int] = {}
    for _, _, o in w.attempts:
        outcomes[o] = outcomes.get(o, 0) + 1
    survivors_down = sorted({sv for t, st in samples for sv, s in st.items()
                             if sv != leader.id and not s.startswith("UP")})
    print(f"\n[haproxy failover] leader {leader.id} SIGKILLed: first write begun after the kill "
          f"acknowledged +{gap:.3f}s; longest pause between acknowledgements {outage:.3f}s; "
          f"killed replica marked DOWN by HAProxy +{down_at - killed_at:.3f}s; "
          f"survivors seen not UP: {survivors_down or 'none'}")
    print(f"[haproxy failover] {len(w.acks)} writes acknowledged ({len(before)} before, {len(after)} "
          f"after the kill) in {len(w.attempts)} attempts: {dict(sorted(outcomes.items()))}")

    # Every acknowledged write is visible to a linearizable read through HAProxy ...
    names = {a.name for a in w.acks}
    top = max(a.version for a in w.acks)

    def read_users(base):
        try:
            status, body = c.request(base, "GET", "/api/v1/users", timeout=8)
        except (OSError, http.client.HTTPException):
            return None
        return body if status == 200 else None
    body = wait_until(lambda: read_users(url), 15, what="a linearizable read through HAProxy")
    assert not body["stale"] and body["version"] >= top
    missing = sorted(names - {u["name"] for u in body["users"]})
    assert not missing, f"acknowledged writes missing through HAProxy: {missing[:10]}"
    # ... and on each surviving replica, asked directly.
    survivors = [r for r in c.replicas if r.alive()]
    assert len(survivors) == 2
    for r in survivors:
        body = wait_until(lambda: read_users(r), 15, what=f"a linearizable read on {r.id}")
        missing = sorted(names - {u["name"] for u in body["users"]})
        assert not missing, f"acknowledged writes missing on {r.id}: {missing[:10]}"

    # Retrying with the same Idempotency-Key returns the first result, also for writes the
    # dead leader acknowledged, and applies nothing twice.
    for a in before[-5:] + after[:5]:
        outcome, replay = write_until_definite(c, url, a.name, a.key, time.monotonic() + 15, [],
                                                  threading.Event())
        # A second application would answer 409 conflict (the user exists), not the first 201.
        assert outcome == "acked" and replay["version"] == a.version, (a, outcome, replay)


@pytest.mark.timeout(60)
def test_replica_without_quorum_is_taken_out_of_rotation(lb):
    """Without a network fault: killing two of three replicas leaves the third alive but without a
    quorum; /readyz fails there, HAProxy marks it DOWN and answers 503 itself rather than routing
    to it. Restarting one peer restores the quorum and the rotation."""
    c, url = lb.cluster, lb.url
    # Agent paths go to their own backend, whose servers follow the API backend's checks.
    assert set(_stat_or_empty(lb.sock, "raftmesh_agents").values()) == {"UP"}
    status, body = c.request(url, "POST", LOGOUT, {}, timeout=5)
    assert isinstance(body, dict) and "error" in body and status < 500, (status, body)  # from a replica
    served = {r["svname"]: int(r["stot"]) for r in haproxy_stat_rows(lb.sock)
              if r["pxname"] == "raftmesh_agents"}
    assert served["BACKEND"] >= 1, served

    lone, *others = c.replicas
    for r in others:
        c.kill(r)
    def not_ready():
        status, body = c.request(lone, "GET", "/readyz", timeout=2)
        return status == 503 and body
    body = wait_until(not_ready, 10, what="/readyz to fail on the replica without a quorum")
    assert body["ready"] is False and body["reason"] in ("no quorum", "no leader"), body
    assert c.request(lone, "GET", "/healthz", timeout=2)[0] == 200  # alive, just not ready
    wait_until(lambda: _stat_or_empty(lb.sock).get(lone.id, "").startswith("DOWN"), 10,
               what="HAProxy to mark the replica without a quorum DOWN")
    status, body = c.request(url, "GET", "/readyz", timeout=5)
    assert status == 503 and not isinstance(body, dict), "HAProxy itself answers: no server is ready"

    c.start(others[0])
    wait_until(lambda: {k: v for k, v in _stat_or_empty(lb.sock).items() if k != others[1].id}
               == {lone.id: "UP", others[0].id: "UP"}, 20,
               what="HAProxy to bring both replicas of the restored quorum back UP")
    outcome, body = write_until_definite(c, url, "after-quorum", "after-quorum", time.monotonic() + 15,
                                            [], threading.Event())
    assert outcome == "acked", outcome


def test_template_renders_to_a_valid_config(tmp_path):
    if not os.path.exists(HAPROXY):
        pytest.skip("haproxy is not installed (deploy/install.sh installs it)")
    with open(TEMPLATE) as f:
        template = f.read()
    with pytest.raises(KeyError, match="RAFTMESH_R3"):
        render(template, {"RAFTMESH_LB_BIND": ":1", "RAFTMESH_LB_STATS": ":2", "RAFTMESH_LB_SOCKET": "/s",
                          "RAFTMESH_R1": "a:1", "RAFTMESH_R2": "b:1"})
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(render(template, {
        "RAFTMESH_LB_BIND": "127.0.0.1:1", "RAFTMESH_LB_STATS": "127.0.0.1:2",
        "RAFTMESH_LB_SOCKET": str(tmp_path / "s.sock"),
        "RAFTMESH_R1": "10.0.0.1:8080", "RAFTMESH_R2": "10.0.0.2:8080", "RAFTMESH_R3": "10.0.0.3:8080"}))
    p = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and "WARNING" not in p.stdout + p.stderr, p.stdout + p.stderr


def test_example_replica_toml_is_accepted(tmp_path):
    """deploy/examples/replica.toml uses only known settings and validates (secret from the env)."""
    config = ReplicaConfig.from_toml(EXAMPLE_TOML, cluster_secret="0123456789abcdef0123")
    config.validate()
    assert config.durability == "fsync" and config.peers and config.raft_addr not in config.peers


def test_agent_streams_through_haproxy_and_reconnects_when_its_replica_dies(lb):
    """The map stream through the deploy/ HAProxy: frames pass unbuffered, and when the
    replica behind a stream is killed the agent reconnects through the same URL and resumes
    from its version."""
    from proto_agent import ProtoAgent
    c = lb.cluster
    assert c.request(lb.url, "POST", "/api/v1/users", {"name": "lbuser"})[0] == 201
    key = c.request(lb.url, "POST", "/api/v1/preauth-keys", {"user": "lbuser", "reusable": True})[1]["key"]
    policy = json.dumps({"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]})
    assert c.request(lb.url, "PUT", "/api/v1/policy", policy)[0] == 200
    a = ProtoAgent(c, key, "lb-a", urls=[lb.url])
    b = ProtoAgent(c, key, "lb-b", urls=[lb.url])
    try:
        a.connect()
        a.pump(lambda s: b.node_id in s.peers())
        serving = next(r for r in c.replicas if r.id == a.stream.replica)
        c.kill(serving)
        a.pump(lambda s: s.kinds[-1] in ("eof", "error"), timeout=15)
        held = a.view.version
        wait_until(lambda: c.request(lb.url, "PATCH", f"/api/v1/nodes/{b.node_id}",
                                     {"name": "lb-renamed"}, timeout=5)[0] == 200, 20,
                   what="a write through HAProxy after the kill")
        wait_until(lambda: _reconnect(a), 20, what="a stream through HAProxy to a live replica")
        assert a.stream.replica != serving.id
        a.pump(lambda s: s.view.netmap.peers[b.node_id].name == "lb-renamed")
        assert a.view.version > held
    finally:
        a.close()
        b.close()


def _reconnect(agent) -> bool:
    from raftmesh.agent.control_client import ControlError
    try:
        agent.connect()
        return True
    except (ControlError, OSError):
        return False


@pytest.mark.timeout(90)
def test_a_console_session_works_through_every_replica_and_outlives_the_one_that_made_it(lb):
    """Console sessions are replicated (api/console/sessions.py): HAProxy spreads a browser's
    requests over all replicas with no stickiness, and killing the replica that signed the
    browser in signs nobody out."""
    c, host = lb.cluster, lb.url.removeprefix("http://")
    page = urllib.request.urlopen(lb.url + "/ui/", timeout=10)
    assert page.status == 200 and "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert not page.headers.get_all("Set-Cookie")  # no stickiness cookie any more
    conn = http.client.HTTPConnection(host, timeout=10)
    conn.request("POST", "/ui/session", json.dumps({"api_key": c.admin_key}),
                 {"Content-Type": "application/json", "Origin": lb.url})
    resp = conn.getresponse()
    signed_in = json.loads(resp.read())
    assert resp.status == 200, signed_in
    cookie = next(x.split(";")[0] for x in resp.headers.get_all("Set-Cookie") if x.startswith("rm_session="))
    conn.close()

    def through_lb(method: str, path: str, body=None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection(host, timeout=10)
        try:
            headers = {"Cookie": cookie, "Origin": lb.url, "X-CSRF-Token": signed_in["csrf_token"],
                       "Content-Type": "application/json"}
            conn.request(method, path, None if body is None else json.dumps(body), headers)
            r = conn.getresponse()
            raw = r.read()
            try:
                return r.status, json.loads(raw)
            except ValueError:  # HAProxy's own page (502/503/504) while it fails a server over
                return r.status, {"body": raw[:200].decode(errors="replace")}
        finally:
            conn.close()

    served_by = set()
    for _ in range(6):  # round robin over the three replicas
        status, who = through_lb("GET", "/ui/session")
        assert status == 200 and who["signed_in"] and who["csrf_token"] == signed_in["csrf_token"], who
        served_by.add(who["replica"])
        assert through_lb("GET", "/api/v1/users")[0] == 200
    assert len(served_by) >= 2, served_by
    assert through_lb("POST", "/api/v1/users", {"name": "via-console-lb"})[0] == 201
    c.kill(next(r for r in c.replicas if r.id == signed_in["replica"]))
    wait_until(lambda: _stat_or_empty(lb.sock).get(signed_in["replica"], "").startswith("DOWN"), 10,
               what="HAProxy to mark the replica that signed in DOWN")
    wait_until(lambda: through_lb("POST", "/api/v1/users", {"name": "after-the-kill"})[0] in (201, 409),
               20, what="a change through the console session after its replica died")
    status, who = through_lb("GET", "/ui/session")
    assert status == 200 and who["signed_in"] and who["replica"] != signed_in["replica"], who
    assert through_lb("GET", "/api/v1/users/after-the-kill")[0] == 200


def test_relay_sessions_through_haproxy_meet_on_one_replica(lb):
    """Two agents' relay WebSockets through the deploy/ HAProxy: the upgrade passes, both
    sessions land on the same replica (balance first: relayed in one hop, not forwarded), and
    WireGuard packets cross between them both ways."""
    from relay_machine import Machine
    c = lb.cluster
    assert c.request(lb.url, "POST", "/api/v1/users", {"name": "relayuser"})[0] == 201
    key = c.request(lb.url, "POST", "/api/v1/preauth-keys", {"user": "relayuser", "reusable": True})[1]["key"]
    machines = [Machine(lb.url, key, n) for n in ("lb-r1", "lb-r2")]
    try:
        for m in machines:
            m.relay.start()
        wait_until(lambda: all(m.relay.server for m in machines), 20, what="relay sessions through HAProxy")
        a, b = machines
        for src, dst, packet in ((a, b, b"\x01initiation"), (b, a, b"\x02response")):
            src.send_to(dst, packet)
            assert dst.wg.recvfrom(4096)[0] == packet
        sessions = {r.id: _metric(c, r, "raftmesh_relay_sessions") for r in c.replicas}
        assert sessions == {"r1": 2.0, "r2": 0.0, "r3": 0.0}
        # replicas' relay links are not for the load balancer to pass on (a replica itself
        # would answer this request without a nonce with 400)
        assert c.request(c.replicas[0], "GET", "/replica/relay-link")[0] == 400
        assert c.request(lb.url, "GET", "/replica/relay-link")[0] == 403
    finally:
        for m in machines:
            m.close()


def _metric(c, replica, name: str) -> float:
    status, text = c.request(replica, "GET", "/metrics")
    assert status == 200
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))
