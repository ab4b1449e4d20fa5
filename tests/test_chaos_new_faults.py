"""The one-way partition and clock faults: their schedule shapes, the nftables rule that
drops one direction only, and libfaketime moving a process's wall clock but not its
monotonic clock."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from raftmesh.chaos import availability, clock
from raftmesh.chaos.schedule import CLOCK_JUMP, CLOCK_SKEW, make_schedule
from raftmesh.lab import replica_net as netlab

from conftest import wait_until

needs_netns = pytest.mark.skipif(bool(netlab.preflight()), reason="needs root, iproute2 and nftables")


def test_oneway_and_clock_windows_target_one_replica_and_are_judged_for_availability():
    events = [e for e in make_schedule(3, 300, ["oneway", "clock"], 5) if e.kind in ("oneway", "clock")]
    assert {e.params.get("drop") for e in events if e.kind == "oneway"} == {"in", "out"}
    clocks = [e for e in events if e.kind == "clock"]
    assert {e.params["mode"] for e in clocks} == {"skew", "jump"}
    for e in clocks:
        low, high = CLOCK_SKEW if e.params["mode"] == "skew" else CLOCK_JUMP
        assert low <= abs(e.params["seconds"]) <= high and e.target in {f"r{i}" for i in range(1, 6)}
    for e in events:
        assert availability.single_replica({"kind": e.kind, "target": "r1", "params": e.params})


@pytest.mark.skipif(clock.library() is None, reason="needs libfaketime (apt install faketime)")
@pytest.mark.timeout(30)
def test_libfaketime_moves_the_wall_clock_of_one_process_and_leaves_its_monotonic_clock(tmp_path):
    control = str(tmp_path / "r1.faketime")
    code = ("import select, sys, time\n"
            "m0, w0 = time.monotonic(), time.time()\n"
            "print('ready', flush=True); sys.stdin.readline()\n"
            "deadline = time.monotonic() + 10\n"
            "while time.time() - w0 < 3000 and time.monotonic() < deadline:\n"
            "    select.select([], [], [], 0.1)\n"
            "print(round(time.time() - w0), round(time.monotonic() - m0), flush=True)\n")
    proc = subprocess.Popen(clock.prefix(control) + [sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        clock.set_offset(control, 3600)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        wall, mono = map(int, proc.stdout.readline().split())
        assert wall >= 3600 and mono < 5, (wall, mono)
        assert abs(time.time() - time.time()) < 1, "this process's clock is untouched"
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(clock.library() is None, reason="needs libfaketime (apt install faketime)")
@pytest.mark.timeout(60)
def test_under_libfaketime_a_wait_on_a_monotonic_condition_lasts_until_its_deadline(tmp_path):
    """libfaketime's forced monotonic fix (on by itself on glibc >= 2.30) misplaced the
    deadline of every wait on a monotonic condition variable, CPython's GIL among them: the
    wait ended at once, every thread of a replica forced a GIL switch and the faked replica
    served 20-60x fewer requests. A wait of 200 ms must last 200 ms (never less, however
    loaded the machine); with the fix on it lasted 0 ms."""
    code = ("import ctypes, time\n"
            "libc = ctypes.CDLL(None)\n"
            "class Timespec(ctypes.Structure):\n"
            "    _fields_ = [('tv_sec', ctypes.c_long), ('tv_nsec', ctypes.c_long)]\n"
            "attr, cond, mutex = (ctypes.create_string_buffer(64) for _ in range(3))\n"
            "libc.pthread_condattr_init(attr)\n"
            "libc.pthread_condattr_setclock(attr, 1)  # CLOCK_MONOTONIC, as CPython's GIL\n"
            "libc.pthread_cond_init(cond, attr)\n"
            "libc.pthread_mutex_init(mutex, None)\n"
            "now = Timespec()\n"
            "libc.clock_gettime(1, ctypes.byref(now))\n"
            "ns = now.tv_nsec + 200_000_000\n"
            "deadline = Timespec(now.tv_sec + ns // 10**9, ns % 10**9)\n"
            "libc.pthread_mutex_lock(mutex)\n"
            "start = time.monotonic()\n"
            "libc.pthread_cond_timedwait(cond, mutex, ctypes.byref(deadline))\n"
            "print(round(time.monotonic() - start, 3))\n")
    out = subprocess.run(clock.prefix(str(tmp_path / "r1.faketime")) + [sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=50, check=True).stdout
    assert float(out) >= 0.19, f"a 200 ms wait on a monotonic condition ended after {float(out)} s"


@needs_netns
@pytest.mark.timeout(60)
def test_a_deaf_replica_drops_what_it_receives_and_still_sends():
    net = netlab.ReplicaNet(3)
    try:
        net.setup()
        net.set_rules(0, netlab.NetRules(deaf_to={net.ips[1]}))
        rules = net.ruleset(0)
        assert f"ip saddr {{ {net.ips[1]} }} drop" in rules or f"ip saddr {net.ips[1]} drop" in rules
        assert "daddr" not in rules, "nothing it sends is dropped"

        def arrives(i, j):
            """Does a UDP datagram from replica i reach replica j?"""
            recv = subprocess.Popen(net.prefix(j) + [sys.executable, "-c", (
                "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                "s.bind((sys.argv[1], 7400)); s.settimeout(2); print('up', flush=True)\n"
                "try: s.recv(10); print('got')\nexcept OSError: print('none')"), net.ips[j]],
                stdout=subprocess.PIPE, text=True)
            try:
                assert recv.stdout.readline().strip() == "up"
                subprocess.run(net.prefix(i) + [sys.executable, "-c", (
                    "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                    "for _ in range(3): s.sendto(b'x', (sys.argv[1], 7400))"), net.ips[j]], timeout=10, check=True)
                return recv.stdout.readline().strip() == "got"
            finally:
                recv.kill()
                recv.wait()
        assert not arrives(1, 0) and arrives(0, 1), "r1 does not hear r2, r2 hears r1"
        assert arrives(2, 0) and arrives(0, 2)
        net.heal()
        assert arrives(1, 0)
    finally:
        net.close()


# -- what the clock fault found -------------------------------------------------------------------

def _signed_register(cluster, r, auth_key: str, skew: float = 0.0):
    import base64
    import os
    import secrets

    from nacl.signing import SigningKey

    from raftmesh.proto.machine_auth import sign_headers
    from raftmesh.proto.routes import REGISTER
    from raftmesh.proto.version import version_header
    signer = SigningKey.generate()
    body = json.dumps({"node_key": base64.b64encode(os.urandom(32)).decode(), "hostname": "clocked",
                       "auth_key": auth_key})
    headers = {**sign_headers(signer, "POST", REGISTER, body.encode(), time.time() + skew, secrets.token_hex(12)),
               **version_header()}
    return cluster.request(r, "POST", REGISTER, body, headers={**headers, "Content-Type": "application/json"})


def _register_answer(cluster, r, auth_key: str, skew: float = 0.0):
    """The replica's answer, once it is not about a leader election (loaded CI machines)."""
    def settled():
        status, body = _signed_register(cluster, r, auth_key, skew)
        error = body.get("error", {}) if isinstance(body, dict) else {}
        election = status == 503 and (error.get("code") in ("no_leader", "outcome_unknown")
                                      or "no quorum" in error.get("message", ""))
        return None if election else (status, body)
    return wait_until(settled, 20, what="an answer that is not about leadership")


@pytest.mark.skipif(clock.library() is None, reason="needs libfaketime (apt install faketime)")
@pytest.mark.timeout(90)
def test_a_replica_whose_clock_is_off_refuses_a_correct_agent_with_503_not_401(tmp_path):
    from raftmesh.lab.local_cluster import LocalCluster
    control = str(tmp_path / "r3.faketime")
    cluster = LocalCluster(str(tmp_path / "c"), replicas=3,
                           command_prefix=lambda r: clock.prefix(control) if r.id == "r3" else [])
    try:
        cluster.start_all()
        cluster.wait_ready(timeout=60)
        r1, r3 = cluster.replicas[0], cluster.replicas[2]
        wait_until(lambda: cluster.request(r1, "POST", "/api/v1/users", {"name": "owner"})[0] in (201, 409), 20,
                   what="the owner user")
        key = wait_until(lambda: (lambda a: a[1]["key"] if a[0] == 201 else None)(cluster.request(
            r1, "POST", "/api/v1/preauth-keys", {"user": "owner", "reusable": True})), 20, what="a pre-auth key")
        clock.set_offset(control, 86400)  # r3's wall clock jumps a day ahead
        wait_until(lambda: cluster.request(r3, "GET", "/api/v1/cluster/self")[1]["replica"] is not None
                   and _signed_register(cluster, r3, key)[0] != 200, 10, what="r3's clock to jump")
        written = iter(range(1000))

        def refused_for_its_clock():  # writes through the others tell r3 the cluster's time
            cluster.request(cluster.replicas[next(written) % 2], "POST", "/api/v1/users", {"name": f"u{next(written)}"})
            answer = _register_answer(cluster, r3, key)  # 503 "cannot yet tell" in its warm-up
            return answer if answer[0] != 401 and "cannot yet tell" not in str(answer[1]) else None
        status, body = wait_until(refused_for_its_clock, 30, what="r3 to see that its own clock is off")
        assert status == 503 and body["error"]["code"] == "not_ready", (status, body)
        assert "clock is +86" in body["error"]["message"], body
        answer = _register_answer(cluster, r1, key)
        assert answer[0] == 200, ("the healthy replicas accept the agent", answer)
        status, body = _register_answer(cluster, r1, key, skew=86400)
        assert (status, body["error"]["code"]) == (401, "unauthenticated"), "an agent whose clock is off is told so"
    finally:
        cluster.stop_all()


@pytest.mark.skipif(clock.library() is None, reason="needs libfaketime (apt install faketime)")
@pytest.mark.timeout(60)
def test_a_replica_that_cannot_yet_tell_whose_clock_is_off_sends_a_correct_agent_elsewhere(tmp_path):
    """Campaign seed 2: restarted while its clock was a day ahead, a replica that had not yet
    heard the others answered a correctly signed registration 401 (check your clock), which
    an agent takes as final. Not ready and without an estimate, it now says 503 not_ready."""
    from raftmesh.lab.local_cluster import LocalCluster
    control = str(tmp_path / "r3.faketime")
    cluster = LocalCluster(str(tmp_path / "c"), replicas=3,
                           command_prefix=lambda r: clock.prefix(control) if r.id == "r3" else [])
    try:
        r3 = cluster.replicas[2]
        cluster.start(r3)  # alone: no quorum, no leader, nothing from the others applied
        def up():
            try:
                return cluster.request(r3, "GET", "/healthz")[0] == 200
            except OSError:
                return False
        wait_until(up, 30, what="r3 up")
        clock.set_offset(control, 86400)
        status, body = wait_until(lambda: (lambda a: a if "clock" in str(a[1]) else None)(
            _signed_register(cluster, r3, "rmp_any")), 10, what="an answer about the clock")
        assert (status, body["error"]["code"]) == (503, "not_ready"), (status, body)
        assert "cannot yet tell whose clock is wrong" in body["error"]["message"], body
    finally:
        cluster.stop_all()


def test_the_cluster_clock_is_the_median_of_recent_proposers_and_says_nothing_when_quiet():
    from types import SimpleNamespace

    from raftmesh.api.cluster_clock import MIN_SAMPLES, SAMPLES, ClusterClock
    listeners = []
    replica = SimpleNamespace(add_apply_listener=listeners.append, add_propose_listener=lambda fn: None)
    cc = ClusterClock(replica)
    cmd = lambda t: SimpleNamespace(time=t)  # noqa: E731
    listeners[0]([(1, cmd(0.0), {})] * 20)  # barriers carry no time
    assert cc.offset() is None
    now = time.time()
    listeners[0]([(i, cmd(now - 3600), {}) for i in range(MIN_SAMPLES)])
    assert cc.offset() == pytest.approx(3600, abs=5), "proposers are an hour behind: this clock is ahead"
    listeners[0]([(i, cmd(time.time()), {}) for i in range(SAMPLES)])
    assert cc.offset() == pytest.approx(0, abs=5), "only recent commands count"


def test_a_replica_off_by_a_day_is_told_by_the_others_commands_not_outvoted_by_its_own():
    """Campaign seed 23: the leader's clock jumped back 14.7 h while another replica was down,
    so half the commands it applied were its own, carrying its own clock; counted, they made
    the median say its clock was right, and correctly signed agents got 401."""
    from types import SimpleNamespace

    from raftmesh.api.cluster_clock import SAMPLES, ClusterClock
    applied, proposed = [], []
    cc = ClusterClock(SimpleNamespace(add_apply_listener=applied.append,
                                      add_propose_listener=proposed.append))
    mine = lambda: SimpleNamespace(time=time.time())  # noqa: E731  (this replica's clock)
    theirs = lambda: SimpleNamespace(time=time.time() + 52773)  # noqa: E731
    batch = []
    for i in range(SAMPLES):
        own = mine()
        proposed[0](own)
        batch += [(2 * i, own, {}), (2 * i + 1, theirs(), {})]
    applied[0](batch)
    assert cc.offset() == pytest.approx(-52773, abs=5), "its clock is behind the others'"


def test_a_step_of_the_local_clock_shifts_the_estimate_at_once(monkeypatch):
    from types import SimpleNamespace

    from raftmesh.api import cluster_clock
    clocks = {"wall": 1000.0, "mono": 50.0}
    monkeypatch.setattr(cluster_clock, "time", SimpleNamespace(time=lambda: clocks["wall"],
                                                               monotonic=lambda: clocks["mono"]))
    listeners = []
    cc = cluster_clock.ClusterClock(SimpleNamespace(add_apply_listener=listeners.append,
                                                    add_propose_listener=lambda fn: None))
    listeners[0]([(i, SimpleNamespace(time=1000.0), {}) for i in range(cluster_clock.MIN_SAMPLES)])
    assert cc.offset() == 0
    clocks["wall"] += 86400  # stepped a day ahead, no command applied since
    assert cc.offset() == 86400
    clocks["wall"], clocks["mono"] = clocks["wall"] + 0.5, clocks["mono"] + 0.5  # time passing is no step
    assert cc.offset() == 86400


def test_a_replica_just_started_has_no_estimate_yet_rather_than_a_quiet_cluster():
    """Campaign run 72: restarted with its clock 3 h behind, a replica was ready 0.5 s later,
    before it had applied 8 of the others' commands, and told a correctly signed agent to
    check its clock (401). For WARMUP after its start no estimate means "not yet" (503)."""
    from types import SimpleNamespace

    from raftmesh.api import cluster_clock
    replica = SimpleNamespace(add_apply_listener=lambda fn: None, add_propose_listener=lambda fn: None)
    cc = cluster_clock.ClusterClock(replica)
    assert cc.offset() is None and cc.warming_up()
    later = time.monotonic() + cluster_clock.WARMUP
    assert not cc.warming_up(later), "a quiet cluster after the warm-up: 401 for a wrong agent clock"
