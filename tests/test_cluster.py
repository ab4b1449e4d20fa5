"""The replicated cluster with real replica processes on loopback."""
import contextlib
import os
import signal
import subprocess
import sys
import threading

from conftest import wait_until

USERS = "/api/v1/users"


def user_names(c, r, stale=False):
    status, body = c.request(r, "GET", USERS + ("?stale=true" if stale else ""))
    assert status == 200, body
    return {u["name"] for u in body["users"]}


def create_user(c, r, name, **kw):
    return c.request(r, "POST", USERS, {"name": name}, **kw)


def test_write_through_follower_read_linearizably_elsewhere(make_cluster):
    c = make_cluster(3)
    leader = c.leader()
    f1, f2 = [r for r in c.replicas if r is not leader]
    status, body = create_user(c, f1, "alice")
    assert status == 201 and body["version"] > 0
    status, body = c.request(f2, "GET", USERS + "/alice")
    assert status == 200 and body["user"]["name"] == "alice"
    assert body["version"] >= 1
    announced = lambda: {m["id"] for m in c.request(f2, "GET", "/api/v1/cluster")[1]["members"]}
    wait_until(lambda: announced() == {"r1", "r2", "r3"}, 10, what="replicas announce their API URLs")
    status, body = c.request(f2, "GET", "/api/v1/cluster")
    assert status == 200 and body["leader"] == leader.id
    assert all(m["reachable"] and m["applied_version"] > 0 for m in body["members"])


def test_leader_kill_loses_no_acknowledged_write(make_cluster):
    c = make_cluster(3)
    acked, stop = [], threading.Event()
    others = lambda: [r for r in c.replicas if r.alive()]

    def writer():
        i = 0
        while not stop.is_set() and i < 2000:
            i += 1
            for r in others():
                try:
                    status, _ = create_user(c, r, f"w{i}", timeout=3,
                                            headers={"Idempotency-Key": f"w{i}"})
                except OSError:
                    continue
                if status == 201:
                    acked.append(f"w{i}")
                    break
                if status == 409:  # an earlier unknown-outcome attempt did apply
                    acked.append(f"w{i}")
                    break

    t = threading.Thread(target=writer)
    t.start()
    try:
        wait_until(lambda: len(acked) >= 20, 20, what="writes before the kill")
        leader = c.leader()
        c.kill(leader)
        at_kill = len(acked)
        wait_until(lambda: len(acked) >= at_kill + 20, 30, what="writes after the leader was killed")
    finally:
        stop.set()
        t.join(30)
    new_leader = c.leader()
    assert new_leader is not leader
    names = user_names(c, new_leader)
    missing = [n for n in acked if n not in names]
    assert not missing, f"acknowledged writes lost: {missing[:10]}"
    c.start(leader)
    c.wait_ready([leader])
    wait_until(lambda: set(acked) <= user_names(c, leader, stale=True), 20, what="restarted replica catches up")


def test_sigkill_all_replicas_keeps_every_acknowledged_write(make_cluster):
    c = make_cluster(3)
    acked = []
    for i in range(60):
        status, _ = create_user(c, c.replicas[i % 3], f"k{i}")
        assert status == 201
        acked.append(f"k{i}")
    for r in c.replicas:
        c.kill(r)
    c.start_all()
    c.wait_ready(timeout=30)
    for r in c.replicas:
        assert set(acked) <= user_names(c, r)
    digests = set()
    for r in c.replicas:
        status, body = c.request(r, "GET", "/api/v1/audit?limit=1000")
        digests.add(tuple(e["hash"] for e in body["entries"]))
    assert len(digests) == 1, "replicas agree on the audit chain after the restart"


def test_every_replica_rebuilds_what_an_os_crash_took_from_snapshot_and_journal(make_cluster):
    """LMDB commits are not fsynced (storage/state_store.py): after an OS crash a replica
    discards its state files and rebuilds them from its Raft snapshot and journal. Here
    all three lose them at once, with the journals compacted past the first writes."""
    c = make_cluster(3, extra_args=["--snapshot-min-entries", "40"])
    acked = [f"o{i}" for i in range(100)]
    for i, name in enumerate(acked):
        assert create_user(c, c.replicas[i % 3], name)[0] == 201

    def compacted():
        return all(c.request(r, "GET", "/api/v1/cluster/self")[1]["replica"]["log_entries"] < 90
                   for r in c.replicas)
    wait_until(compacted, 20, what="snapshots and compacted journals on every replica")
    for r in c.replicas:
        c.kill(r)
        state = os.path.join(r.data_dir, "state")
        with open(os.path.join(state, "unsynced-since-boot"), "w") as f:
            f.write("a-boot-before-the-crash")
        with open(os.path.join(state, "data.mdb"), "r+b") as f:
            f.write(b"\xff" * 8192)  # torn by the crash: must not be read
    c.start_all()
    c.wait_ready(timeout=30)
    for r in c.replicas:
        assert set(acked) <= user_names(c, r), f"{r.id} lost acknowledged writes"
    chains = {tuple(e["hash"] for e in c.request(r, "GET", "/api/v1/audit?limit=1000")[1]["entries"])
              for r in c.replicas}
    assert len(chains) == 1 and len(next(iter(chains))) >= 100, "one audit chain, rebuilt whole"


def fall_behind_a_compacted_log(c, write, writes: int, entries_left: int):
    """Stop a follower, `write(replica, i)` through the others and compact their logs: the
    follower can then catch up only from a snapshot. Returns (lagging, live replicas)."""
    lagging = next(r for r in c.replicas if r is not c.leader())
    c.kill(lagging)
    live = [r for r in c.replicas if r.alive()]
    for i in range(writes):
        write(live[i % 2], i)
    for r in live:
        assert c.request(r, "POST", "/api/v1/cluster/snapshot")[0] == 202

    def compacted():
        return all(c.request(r, "GET", "/api/v1/cluster/self")[1]["replica"]["log_entries"] < entries_left
                   for r in live)
    wait_until(compacted, 30, what="log compaction on the live replicas")
    return lagging, live


def test_lagging_replica_catches_up_from_a_snapshot(make_cluster):
    c = make_cluster(3, extra_args=["--snapshot-min-entries", "50"])

    def write(r, i):
        assert create_user(c, r, f"s{i}")[0] == 201
    lagging, _ = fall_behind_a_compacted_log(c, write, 150, 100)
    c.start(lagging)
    c.wait_ready([lagging])
    wait_until(lambda: {f"s{i}" for i in range(150)} <= user_names(c, lagging, stale=True), 30,
               what="lagging replica to catch up")
    metrics = c.request(lagging, "GET", "/metrics")[1]
    installs = [l for l in metrics.splitlines() if l.startswith("raftmesh_snapshot_installs_total")]
    assert installs and float(installs[0].split()[-1]) >= 1, "caught up through a snapshot"


def test_add_and_remove_a_member(make_cluster):
    c = make_cluster(3)
    assert create_user(c, c.replicas[0], "before-join")[0] == 201
    new = c.add_replica()
    status, body = c.request(c.replicas[0], "POST", "/api/v1/cluster/members",
                             {"id": new.id, "raft_addr": new.raft_addr, "api_url": new.api_url})
    assert status == 201, body
    c.wait_ready([new])
    wait_until(lambda: "before-join" in user_names(c, new, stale=True), 20, what="new member has the state")
    assert create_user(c, new, "via-new-member")[0] == 201
    status, body = c.request(new, "GET", "/api/v1/cluster")
    assert len(body["members"]) == 4
    # Remove a follower that is not the new member.
    victim = next(r for r in c.replicas[:3] if r is not c.leader())
    status, body = c.request(new, "DELETE", f"/api/v1/cluster/members/{victim.id}")
    assert status == 200, body
    assert body["deleted"]["id"] == victim.id and body["nodes_marked_offline"] == 0, body
    c.kill(victim, signal.SIGTERM)
    wait_until(lambda: len(c.request(new, "GET", "/api/v1/cluster")[1]["members"]) == 3, 10,
               what="member list shrinks")
    assert create_user(c, new, "after-remove")[0] == 201
    status, body = c.request(new, "POST", "/api/v1/cluster/members",
                             {"id": new.id, "raft_addr": new.raft_addr, "api_url": new.api_url})
    assert status == 409 and body["error"]["code"] == "already_member"


def test_single_replica_and_five_replica_clusters(make_cluster):
    one = make_cluster(1)
    assert create_user(one, one.replicas[0], "solo")[0] == 201
    assert "solo" in user_names(one, one.replicas[0])
    five = make_cluster(5)
    assert create_user(five, five.replicas[4], "quintet")[0] == 201
    assert all("quintet" in user_names(five, r) for r in five.replicas)
    c_leader = five.leader()
    five.kill(c_leader)
    five.kill(next(r for r in five.replicas if r.alive() and r is not c_leader))
    survivor = next(r for r in five.replicas if r.alive())
    wait_until(lambda: create_user(five, survivor, "after-two-down")[0] == 201, 20,
               what="3 of 5 keep accepting writes")


def test_no_quorum_write_is_refused_or_unknown_never_false_success(make_cluster):
    c = make_cluster(3)
    survivor = c.replicas[0]
    for r in c.replicas[1:]:
        c.kill(r)
    status, body = create_user(c, survivor, "orphan", timeout=15)
    assert status == 503 and body["error"]["code"] in ("no_leader", "outcome_unknown")
    status, body = c.request(survivor, "GET", USERS, timeout=15)
    assert status == 503 and body["error"]["code"] == "not_ready"
    status, body = c.request(survivor, "GET", USERS + "?stale=true")
    assert status == 200 and body["stale"] is True
    status, body = c.request(survivor, "GET", USERS + "?stale=true&max_staleness=1")
    assert status == 503 and body["error"]["code"] == "not_ready"  # no leader heard for > 1 s
    assert c.request(survivor, "GET", "/readyz")[0] == 503


def test_replica_refuses_to_start_without_a_cluster_secret(tmp_path):
    base = [sys.executable, "-m", "raftmesh.cli.main", "server", "--id", "x", "--raft-addr",
            "127.0.0.1:1", "--data-dir", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "RAFTMESH_CLUSTER_SECRET"}
    p = subprocess.run(base, env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "cluster secret is required" in p.stderr
    p = subprocess.run(base, env=dict(env, RAFTMESH_CLUSTER_SECRET="short"), capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 2 and "at least 16 bytes" in p.stderr


def test_replica_refuses_to_start_on_a_journal_that_does_not_follow_on(tmp_path):
    """A clear message and exit status 2 (systemd does not retry it), the file left as it was."""
    from raftmesh.storage.journal import _MAGIC, _encode
    journal = tmp_path / "raft.journal"
    data = _MAGIC + _encode(b"a", 1, 1) + _encode(b"c", 3, 1)
    journal.write_bytes(data)
    p = subprocess.run([sys.executable, "-m", "raftmesh.cli.main", "server", "--id", "x",
                        "--raft-addr", "127.0.0.1:1", "--data-dir", str(tmp_path)],
                       env=dict(os.environ, RAFTMESH_CLUSTER_SECRET="s" * 16),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"raftmesh server: {journal}: the record at byte" in p.stderr
    assert "Traceback" not in p.stderr
    assert journal.read_bytes() == data


@contextlib.contextmanager
def dev_stopped_with_ctrl_c(*args: str):
    """`raftmesh dev` running, stopped at the end as a user does, with Ctrl-C (SIGINT).

    SIGINT starts at its default disposition: under a test runner launched in the background
    of a script it is inherited ignored, and Python then never raises KeyboardInterrupt.
    Should the process not stop, it and its replicas are killed by pid and the test fails."""
    from raftmesh.lab.processes import child_pids, pid_running
    p = subprocess.Popen([sys.executable, "-m", "raftmesh.cli.main", "dev", *args],
                         stdout=subprocess.DEVNULL,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        yield p
    finally:
        replicas = child_pids(p.pid)
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            for pid in [p.pid] + replicas:
                if pid_running(pid):
                    os.kill(pid, signal.SIGKILL)
            p.wait(timeout=10)
            raise AssertionError("raftmesh dev did not stop within 30 s of SIGINT")


def test_dev_command_writes_cluster_json(tmp_path):
    data = tmp_path / "dev"
    with dev_stopped_with_ctrl_c("--replicas", "3", "--data-dir", str(data)):
        wait_until(lambda: (data / "cluster.json").exists(), 60, what="cluster.json")
        import json
        desc = json.loads((data / "cluster.json").read_text())
        assert len(desc["replicas"]) == 3 and desc["admin_key"].startswith("rmk_")
        assert set(desc["replicas"][0]) >= {"id", "api_url", "raft_addr"}
        assert oct((data / "cluster.json").stat().st_mode & 0o777) == "0o600"
        import urllib.request
        req = urllib.request.Request(desc["replicas"][1]["api_url"] + USERS, data=b'{"name":"dev"}',
                                     method="POST", headers={"Authorization": "Bearer " + desc["admin_key"],
                                                               "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 201
    assert_gone(desc["replicas"])
    # Run again on the same directory: the same cluster comes back (its Raft state names
    # members by address, and its admin key is the bootstrapped one), with the data.
    stale = (data / "cluster.json").stat().st_mtime_ns
    with dev_stopped_with_ctrl_c("--data-dir", str(data)):
        wait_until(lambda: (data / "cluster.json").stat().st_mtime_ns != stale, 60,
                   what="the resumed cluster ready")
        again = json.loads((data / "cluster.json").read_text())
        assert [(r["id"], r["api_url"], r["raft_addr"]) for r in again["replicas"]] == \
            [(r["id"], r["api_url"], r["raft_addr"]) for r in desc["replicas"]]
        assert again["admin_key"] == desc["admin_key"]
        req = urllib.request.Request(again["replicas"][2]["api_url"] + USERS,
                                     headers={"Authorization": "Bearer " + desc["admin_key"]})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert "dev" in [u["name"] for u in json.loads(resp.read())["users"]]
    assert_gone(again["replicas"])
    bad = subprocess.run([sys.executable, "-m", "raftmesh.cli.main", "dev", "--data-dir", str(data),
                          "--replicas", "5"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "3-replica cluster" in bad.stderr
    (data / "cluster.json").unlink()  # replica data without its description: refused, named
    bad = subprocess.run([sys.executable, "-m", "raftmesh.cli.main", "dev", "--data-dir", str(data)],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "no cluster.json" in bad.stderr


def assert_gone(replicas: list[dict]) -> None:
    for r in replicas:
        try:
            os.kill(r["pid"], 0)
            alive = True
        except ProcessLookupError:
            alive = False
        assert not alive, f"dev left replica {r['id']} running"


def test_restart_from_snapshot_keeps_the_membership_and_tolerates_a_failure(make_cluster):
    """Regression: members loaded from a snapshot as strings made each replica count itself
    twice, so after a restart a 3-replica cluster lost quorum when one replica died."""
    c = make_cluster(3)
    assert create_user(c, c.replicas[0], "pre-snapshot")[0] == 201
    for r in c.replicas:
        assert c.request(r, "POST", "/api/v1/cluster/snapshot")[0] == 202
    wait_until(lambda: all(os.path.exists(os.path.join(r.data_dir, "raft.snapshot")) for r in c.replicas),
               10, what="snapshots on every replica")
    for r in c.replicas:
        c.kill(r)
    c.start_all()
    c.wait_ready()
    for r in c.replicas:
        members = c.request(r, "GET", "/api/v1/cluster/self")[1]["replica"]["members"]
        assert len(members) == 3, members
    c.kill(next(r for r in c.replicas if r is not c.leader()))
    survivor = next(r for r in c.replicas if r.alive())
    wait_until(lambda: create_user(c, survivor, "after-restart")[0] == 201, 20,
               what="writes with one of three replicas down after a restart from snapshots")


def test_wait_ready_says_why_a_replica_is_not_ready(make_cluster):
    """A replica that never gets ready is reported with its last /readyz answer and its
    Raft status, so a failed chaos run or test carries the evidence with it."""
    import pytest
    c = make_cluster(3)
    for r in c.replicas[1:]:
        c.kill(r)
    # The survivor notices the lost quorum within an election timeout or two; on a starved
    # machine later, and the evidence below is what it says once it has.
    wait_until(lambda: "no quorum" in str(c.request(c.replicas[0], "GET", "/readyz")[1]), 30,
               what="the survivor reporting no quorum")
    with pytest.raises(TimeoutError) as e:
        c.wait_ready([c.replicas[0]], timeout=3)
    text = str(e.value)
    assert "not ready within 3" in text and "/readyz 503" in text and "no quorum" in text
    assert "'has_quorum': False" in text and "'applied_version'" in text


def test_append_entries_rejections_rewind_to_the_follower_commit_index():
    """A rejection names one safe point, so replies to AppendEntries already in flight
    cannot undo each other (the livelock cluster/raft/pysyncobj_replica.rewind_to_commit explains)."""
    from raftmesh.cluster.raft.pysyncobj_replica import rewind_to_commit
    mismatch = {"type": "next_node_idx", "next_node_idx": 3423, "reset": True, "success": False}
    beyond = dict(mismatch, next_node_idx=3424)
    assert rewind_to_commit(mismatch, 3417)["next_node_idx"] == 3418
    assert rewind_to_commit(beyond, 3417)["next_node_idx"] == 3418
    assert rewind_to_commit(dict(mismatch, next_node_idx=12), 3417)["next_node_idx"] == 12
    chunk = {"type": "next_node_idx", "next_node_idx": 3424, "reset": False, "success": False}
    assert rewind_to_commit(chunk, 3417) is chunk  # a large entry's chunks are acknowledged as-is


def test_dev_bind_puts_every_service_on_the_given_address(tmp_path):
    """API, STUN (and the relay, on the API port) listen on --bind, and cluster.json names it."""
    import json
    import socket

    from raftmesh.proto import stun
    data = tmp_path / "dev"
    with dev_stopped_with_ctrl_c("--replicas", "1", "--data-dir", str(data), "--bind", "127.0.0.2"):
        wait_until(lambda: (data / "cluster.json").exists(), 60, what="cluster.json")
        desc = json.loads((data / "cluster.json").read_text())
        api_url, raft_addr = desc["replicas"][0]["api_url"], desc["replicas"][0]["raft_addr"]
        assert api_url.startswith("http://127.0.0.2:") and raft_addr.startswith("127.0.0.2:")
        port = int(api_url.rsplit(":", 1)[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            txid = stun.new_transaction_id()
            s.sendto(stun.binding_request(txid), ("127.0.0.2", port))
            assert stun.mapped_address(s.recv(2048), txid).startswith("127.0.0.1:")
    assert_gone(desc["replicas"])
    for argv, problem in ((["--bind", "127.0.0.3"], "bound to 127.0.0.2"),
                          (["--bind", "192.0.2.77"], "cannot listen on 192.0.2.77"),
                          (["--bind", "localhost"], "needs an IP address")):
        bad = subprocess.run([sys.executable, "-m", "raftmesh.cli.main", "dev", "--data-dir",
                              str(data), *argv], capture_output=True, text=True, timeout=30)
        assert bad.returncode == 2 and problem in bad.stderr, bad.stderr
