"""Availability: the per-window write-gap measure and its check on hand-made data, and the
cluster fixes it led to, on real replicas in network namespaces (a cut-off replica, also a
leader cut off one way, answers within about an election timeout, and serves again soon
after the heal)."""
from __future__ import annotations

import concurrent.futures
import re
import time

import pytest

from raftmesh.chaos import availability
from raftmesh.lab import replica_net as netlab
from raftmesh.lab.local_cluster import LocalCluster

from conftest import wait_until

PARTITION_SECONDS = 6.0
needs_netns = pytest.mark.skipif(bool(netlab.preflight()), reason="needs root, iproute2 and nftables")


def window(index, kind, target, start, end, **params):
    return {"index": index, "kind": kind, "target": target, "start": start, "end": end,
            "params": params, "detail": f"{kind} {target}", "leader": "r1"}


def test_the_gap_is_measured_on_the_replicas_the_fault_spared_and_after_the_heal():
    acks = [(t / 10, "r1") for t in range(0, 100)]  # r1 writes every 0.1 s throughout
    acks += [(t / 10, "r2") for t in range(0, 30)] + [(t / 10, "r2") for t in range(65, 100)]
    timeline = [window(0, "pause", "r1", 2.0, 5.0), window(1, "pause", "r3", 6.0, 8.0)]
    # During #0 only r2 counts: it stopped at 2.9 and came back at 6.5 (after the heal at 5.0).
    gaps = availability.fault_gaps(acks, timeline, run_end=10.0)
    assert gaps[0]["during"] == {"seconds": 2.1, "from": 2.9, "to": 5.0}
    assert gaps[0]["after"]["seconds"] == pytest.approx(0.1), "r1 wrote right after the heal"
    assert gaps[1]["during"]["seconds"] == pytest.approx(0.1)
    check = availability.check_available(gaps)
    assert not check.ok and "#0 pause r1" in check.evidence[0] and len(check.evidence) == 1


def test_only_single_replica_faults_are_judged():
    assert availability.single_replica(window(0, "partition", "r2", 0, 1, mode="isolate-leader"))
    assert not availability.single_replica(window(0, "partition", "", 0, 1, mode="halves"))
    assert availability.single_replica(window(0, "loss", "r2", 0, 1, percent=5))
    assert not availability.single_replica(window(0, "loss", "all", 0, 1, percent=5))
    assert not availability.single_replica(window(0, "membership", "r2", 0, 1))
    assert not availability.single_replica(window(0, "pause", "r2", 0, 1, all_ready_at_start=False)), \
        "with another replica still restarting, a pause leaves no working majority"
    gaps = availability.fault_gaps([], [window(0, "partition", "", 1.0, 9.0, mode="halves")], 10.0)
    assert gaps[0]["during"]["seconds"] == 8.0
    assert availability.check_available(gaps).ok, "a majority-less fault may stop writes"


def test_a_gap_after_the_heal_fails_the_check_and_ends_at_the_next_fault():
    acks = [(t / 10, "r2") for t in range(0, 40)] + [(7.5, "r2")]
    timeline = [window(0, "kill", "r1", 1.0, 3.5), window(1, "pause", "r3", 6.0, 6.5)]
    gaps = availability.fault_gaps(acks, timeline, run_end=10.0)
    assert gaps[0]["after"] == {"seconds": 2.1, "from": 3.9, "to": 6.0}
    assert not availability.check_available(gaps).ok
    late = availability.fault_gaps(acks, [window(0, "kill", "r1", 9.0, 12.0)], run_end=10.0)
    assert late[0]["during"]["to"] == 10.0 and late[0]["after"]["seconds"] == 0, "no writes after the run"


# -- the cluster: a replica cut off from the others -------------------------------------------

@pytest.fixture
def netcluster(tmp_path):
    net = netlab.ReplicaNet(3)
    cluster = None
    try:
        net.setup()
        cluster = LocalCluster(str(tmp_path / "c"), replicas=3, hosts=net.ips, ports=(7100, 8100),
                               command_prefix=lambda r: net.prefix(int(r.id[1:]) - 1))
        cluster.start_all()
        cluster.wait_ready(timeout=60)
        yield net, cluster
    finally:
        if cluster is not None:
            cluster.stop_all()
        net.close()


def _timed_write(cluster, r, name):
    start = time.monotonic()
    try:
        status, body = cluster.request(r, "POST", "/api/v1/users", {"name": name}, timeout=15)
    except OSError as e:
        status, body = None, repr(e)
    return status, body, time.monotonic() - start


def _isolate(net, cluster, victim, drop="both"):
    """Cut `victim` off: both ways, or one way like the chaos `oneway` fault ("in": it hears
    nobody, "out": nobody hears it)."""
    i = cluster.replicas.index(victim)
    others = {ip for j, ip in enumerate(net.ips) if j != i}
    if drop == "in":
        net.set_rules(i, netlab.NetRules(deaf_to=others))
        return
    if drop == "both":
        net.set_rules(i, netlab.NetRules(blocked=others))
    for j in range(len(net.ips)):
        if j != i:
            net.set_rules(j, netlab.NetRules(deaf_to={net.ips[i]}) if drop == "out"
                          else netlab.NetRules(blocked={net.ips[i]}))


@needs_netns
@pytest.mark.timeout(120)
@pytest.mark.parametrize("who, drop", [("leader", "both"), ("follower", "both"), ("leader", "in"),
                                       ("leader", "out")])
def test_a_cut_off_replica_answers_within_about_an_election_and_serves_soon_after_the_heal(netcluster, who,
                                                                                          drop):
    net, cluster = netcluster
    leader = cluster.leader()
    victim = leader if who == "leader" else next(r for r in cluster.replicas if r is not leader)
    wait_until(lambda: _timed_write(cluster, victim, f"warm{time.monotonic()}")[0] == 201, 20,
               what="a first write through the victim")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        _isolate(net, cluster, victim, drop)
        cut = time.monotonic()
        # Writes in flight when the replica lost its quorum, then one that comes later.
        first = [pool.submit(_timed_write, cluster, victim, f"in-flight{k}") for k in range(4)]
        later = pool.submit(lambda: (wait_until(lambda: time.monotonic() - cut > 2.0, 5), _timed_write(
            cluster, victim, "later"))[1])
        answers = [f.result() for f in first] + [later.result()]
    for status, body, took in answers:
        assert status == 503 and took < 2.5, f"answered {status} {body} after {took:.1f}s"
    assert answers[-1][1]["error"]["code"] == "no_leader" and answers[-1][2] < 0.5, answers[-1]
    # Long enough for TCP keepalive to drop the peers' connections, as in a chaos window.
    wait_until(lambda: time.monotonic() - cut > PARTITION_SECONDS, PARTITION_SECONDS + 5, what="the fault's end")
    net.heal()
    healed = time.monotonic()
    wait_until(lambda: _timed_write(cluster, victim, f"back{time.monotonic()}")[0] == 201, 20,
               interval=0.1, what="a write through the healed replica")
    assert time.monotonic() - healed < 3.0, f"the healed replica served again only after {time.monotonic() - healed:.1f}s"


def _self(cluster, r):
    try:
        status, body = cluster.request(r, "GET", "/api/v1/cluster/self", timeout=2)
    except OSError:
        return None
    return body["replica"] if status == 200 else None


@pytest.mark.timeout(90)
def test_a_resumed_old_leader_does_not_depose_the_leader_elected_while_it_was_paused(make_cluster):
    import signal
    cluster = make_cluster(3)
    old = cluster.leader()
    others = [r for r in cluster.replicas if r is not old]
    old.proc.send_signal(signal.SIGSTOP)
    try:
        new = wait_until(lambda: next((r for r in others if (_self(cluster, r) or {}).get("state") == "leader"), None),
                         20, what="a new leader while the old one is paused")
        # Paused well past the others' 1 s connection timeout, as in a chaos pause window.
        wait_until(lambda: (_self(cluster, new) or {}).get("state") == "leader"
                   and all((_self(cluster, r) or {}).get("leader") for r in others), 10, what="a settled majority")
        term = _self(cluster, new)["term"]
        paused = time.monotonic()
        pool = concurrent.futures.ThreadPoolExecutor(3)
        held = [pool.submit(_timed_write, cluster, old, f"held{k}") for k in range(3)]  # queued in the paused process
        wait_until(lambda: time.monotonic() - paused > 2.0, 5, what="the pause's end")
    finally:
        old.proc.send_signal(signal.SIGCONT)
    resumed = time.monotonic()
    for f in held:
        status, body, _ = f.result()
        assert status in (201, 503) and time.monotonic() - resumed < 2.0, \
            f"a request held by the paused leader was answered {status} {body} {time.monotonic() - resumed:.1f}s after the resume"
    pool.shutdown()
    wait_until(lambda: (_self(cluster, old) or {}).get("leader") == _self(cluster, new)["raft_addr"], 20,
               what="the resumed replica following the new leader")
    after = _self(cluster, new)
    assert (after["state"], after["term"]) == ("leader", term), \
        f"the resumed old leader forced an election: {after['state']} at term {after['term']} (was {term})"
    # The pause shows as a slow Raft tick on the paused replica, counted and logged.
    status, text = cluster.request(old, "GET", "/metrics")
    slow = re.search(r"^raftmesh_raft_slow_ticks_total (\S+)$", text, re.M)
    assert status == 200 and slow and float(slow.group(1)) >= 1, slow
    with open(f"{cluster.log_dir}/{old.id}.log", errors="replace") as log:
        assert "raft tick took" in log.read()


@needs_netns
@pytest.mark.timeout(120)
def test_a_replica_back_from_isolation_does_not_depose_the_working_leader(netcluster):
    """Pre-vote: cut off, a follower used to stand for election (its term rising while it
    could still see a connection), and its higher term deposed the leader at the heal. Then
    the other follower did, with the returning one's pre-vote: it compared pysyncobj's
    election deadline with the wrong clock (tests/test_prevote_clock.py)."""
    net, cluster = netcluster
    leader = cluster.leader()
    victim = next(r for r in cluster.replicas if r is not leader)
    wait_until(lambda: (_self(cluster, victim) or {}).get("leader") == _self(cluster, leader)["raft_addr"], 20,
               what="the victim following the leader")
    term = _self(cluster, leader)["term"]
    _isolate(net, cluster, victim)
    cut = time.monotonic()
    wait_until(lambda: time.monotonic() - cut > 4.0, 10, what="the fault's end")  # past an election or two
    net.heal()
    wait_until(lambda: (_self(cluster, victim) or {}).get("leader") == _self(cluster, leader)["raft_addr"], 20,
               what="the victim following the leader again")
    after = _self(cluster, leader)
    assert (after["state"], after["term"]) == ("leader", term), \
        f"the returning replica forced an election: leader now {after['state']} at term {after['term']} (was {term})"
