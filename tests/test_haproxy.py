"""Real HAProxy (deploy/haproxy/haproxy.cfg) in front of 3 replicas while the leader dies."""
import os
import subprocess
import threading
import time
import urllib.request

import pytest

from conftest import wait_until
from raftmesh.cluster.launcher import free_ports

CFG = os.path.join(os.path.dirname(__file__), "..", "deploy", "haproxy", "haproxy.cfg")


@pytest.fixture
def haproxy(make_cluster, tmp_path):
    if not os.path.exists("/usr/sbin/haproxy"):
        pytest.skip("haproxy is not installed (deploy/install.sh installs it)")
    c = make_cluster(3)
    lb_port, stats_port = free_ports(2)
    env = dict(os.environ, RAFTMESH_LB_BIND=f"127.0.0.1:{lb_port}",
               RAFTMESH_LB_STATS=f"127.0.0.1:{stats_port}",
               **{f"RAFTMESH_R{i + 1}": r.api_url.removeprefix("http://") for i, r in enumerate(c.replicas)})
    log = open(tmp_path / "haproxy.log", "wb")
    proc = subprocess.Popen(["/usr/sbin/haproxy", "-db", "-f", CFG], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{lb_port}"
    try:
        wait_until(lambda: _ready_through(c, url), 20, what="HAProxy to route to ready replicas")
        yield c, url, f"http://127.0.0.1:{stats_port}/stats;csv"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def _ready_through(c, url):
    try:
        return c.request(url, "GET", "/readyz", timeout=1)[0] == 200
    except OSError:
        return False


def _server_status(stats_url: str) -> dict:
    with urllib.request.urlopen(stats_url, timeout=2) as r:
        lines = r.read().decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, l.split(","))) for l in lines[1:] if l]
    return {row["svname"]: row["status"] for row in rows if row["pxname"] == "raftmesh_replicas"}


def test_writes_through_haproxy_survive_leader_kill(haproxy):
    c, url, stats = haproxy
    acked, attempts, stop = [], [0], threading.Event()
    ack_times: list[float] = []

    def writer():
        i = 0
        while not stop.is_set() and i < 3000:
            i += 1
            name, deadline = f"lb{i}", time.monotonic() + 20
            while time.monotonic() < deadline and not stop.is_set():
                attempts[0] += 1
                try:
                    status, body = c.request(url, "POST", "/api/v1/users", {"name": name}, timeout=8,
                                             headers={"Idempotency-Key": name})
                except OSError:
                    continue  # connection reset by the dying replica: outcome unknown, retry same key
                if status == 201:
                    acked.append(name)
                    ack_times.append(time.monotonic())
                    break
                assert status == 503 or status == 502, (status, body)  # no_leader / outcome_unknown

    t = threading.Thread(target=writer)
    t.start()
    try:
        wait_until(lambda: len(acked) >= 30, 30, what="writes before the kill")
        leader = c.leader()
        killed_at = time.monotonic()
        c.kill(leader)
        wait_until(lambda: sum(1 for x in ack_times if x > killed_at) >= 30, 40,
                   what="writes through HAProxy after the leader was killed")
        wait_until(lambda: _server_status(stats).get(leader.id) == "DOWN", 10,
                   what="HAProxy to mark the killed replica DOWN")
    finally:
        stop.set()
        t.join(30)
    after = [x for x in ack_times if x > killed_at]
    print(f"\nfirst acknowledged write {after[0] - killed_at:.2f}s after SIGKILL of the leader; "
          f"{len(acked)} acked in {attempts[0]} attempts")
    status, body = c.request(url, "GET", "/api/v1/users")
    assert status == 200
    names = {u["name"] for u in body["users"]}
    missing = [n for n in acked if n not in names]
    assert not missing, f"acknowledged writes lost: {missing[:10]}"
    for r in c.replicas:
        if r.alive():
            status, body = c.request(r, "GET", "/api/v1/users")
            assert set(acked) <= {u["name"] for u in body["users"]}
