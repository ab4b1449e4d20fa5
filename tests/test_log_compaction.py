"""When a replica snapshots: entries alone suffice for a small state; a large one also waits
for the journal to hold half a snapshot's bytes (cluster/raft/pysyncobj_replica.py)."""
from raftmesh.cluster.commands import UserCreate
from raftmesh.cluster.config import ReplicaConfig
from raftmesh.lab.local_cluster import free_ports
from raftmesh.cluster.raft import Outcome
from raftmesh.cluster.raft.pysyncobj_replica import SNAPSHOT_JOURNAL_SHARE, RaftReplica

from conftest import wait_until


def create(r, name, display=""):
    args = {"name": name, **({"display_name": display} if display else {})}
    assert r.propose(UserCreate(**args, time=1.0)).result(10).kind == Outcome.APPLIED


def test_compaction_waits_for_the_journal_to_hold_half_a_snapshot(tmp_path):
    (port,) = free_ports(1)
    r = RaftReplica(ReplicaConfig(id="r0", raft_addr=f"127.0.0.1:{port}", peers=[],
                                  data_dir=str(tmp_path / "r0"), cluster_secret="s" * 16,
                                  snapshot_min_entries=20))
    try:
        wait_until(lambda: r.status.get("state") == "leader", 10, what="a leader")
        for i in range(30):
            create(r, f"a{i}")
        wait_until(lambda: r.stats["snapshots"] == 1, 10, what="the first snapshot (entries)")
        wait_until(lambda: len(r.journal) < 20, 10, what="the journal compacted")
        half = r._snapshot_bytes * SNAPSHOT_JOURNAL_SHARE
        i = 0
        while r.journal.size() < half * 0.8:
            create(r, f"b{i}")
            i += 1
        assert i > 20, f"only {i} entries to fill half a snapshot ({half:.0f} bytes)"
        assert r.stats["snapshots"] == 1, "enough entries, not enough bytes: no snapshot"
        while r.journal.size() < half:
            create(r, f"c{i}", display="x" * 200)
            i += 1
        wait_until(lambda: r.stats["snapshots"] == 2, 10, what="a snapshot once the bytes are there")
    finally:
        r.stop()


def test_a_single_replica_commits_without_waiting_for_an_idle_tick(tmp_path):
    """Alone, no follower's ack wakes the tick that commits a new entry; it used to wait
    for the idle timeout (50 ms by default, here 2 s) on every write."""
    (port,) = free_ports(1)
    r = RaftReplica(ReplicaConfig(id="r0", raft_addr=f"127.0.0.1:{port}", peers=[],
                                  data_dir=str(tmp_path / "r0"), cluster_secret="s" * 16, tick=2.0))
    try:
        wait_until(lambda: r.status.get("state") == "leader", 20, what="a leader")
        for i in range(3):
            fut = r.propose(UserCreate(name=f"u{i}", time=1.0))
            assert fut.result(1).kind == Outcome.APPLIED, "committed well before an idle tick"
    finally:
        r.stop()
