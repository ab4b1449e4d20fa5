"""Raft is behind one adapter (cluster/raft/): nothing else imports pysyncobj or touches its
private names, and the in-memory Raft keeps the interface's promises."""
from __future__ import annotations

import asyncio
import pathlib
import re

import pytest

from raftmesh.cluster.commands import UserCreate
from raftmesh.cluster.config import ReplicaConfig
from raftmesh.cluster.raft import Outcome, Raft
from raftmesh.cluster.raft.in_memory import InMemoryRaft
from raftmesh.cluster.raft.pysyncobj_replica import RaftReplica

ROOT = pathlib.Path(__file__).resolve().parent.parent
ADAPTER = ROOT / "cluster" / "raft"
# storage/journal.py implements pysyncobj's public Journal interface (docs/durability.md).
MAY_IMPORT_PYSYNCOBJ = {ROOT / "storage" / "journal.py"}
FOLDERS = ["cluster", "storage", "proto", "api", "agent", "cli", "lab", "chaos", "bench", "tests"]
# Tests of the adapter's pysyncobj side itself, which feed it Raft messages by hand or
# compare with stock pysyncobj; every other test goes through the interface.
WHITE_BOX_TESTS = {ROOT / "tests" / f for f in (
    "raft_by_hand.py", "test_follower_truncation.py", "test_lazy_commit.py", "test_raft_codec.py",
    "test_raft_connection.py", "test_state_store.py", "test_transport_crypto.py",
    "test_raft_adapter.py", "test_prevote_clock.py", "test_prevote_gate.py",
    "test_removed_peer_links.py")}
IMPORT = re.compile(r"^\s*(?:import|from)\s+pysyncobj\b", re.M)
# Name mangling: `__name` inside class C becomes `_C__name`. Any such name reaches into a
# class's private members from outside it; pysyncobj's classes are the only ones we reach into.
PRIVATE = re.compile(r"\b_[A-Z][A-Za-z0-9]*__[A-Za-z_]\w*")


def sources_outside_adapter():
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if ADAPTER not in path.parents and path not in WHITE_BOX_TESTS:
                yield path


def test_nothing_outside_the_adapter_imports_pysyncobj():
    offenders = [str(p.relative_to(ROOT)) for p in sources_outside_adapter()
                 if p not in MAY_IMPORT_PYSYNCOBJ and IMPORT.search(p.read_text())]
    assert offenders == []


def test_no_pysyncobj_private_name_outside_the_adapter():
    offenders = {str(p.relative_to(ROOT)): PRIVATE.findall(p.read_text())
                 for p in sources_outside_adapter()}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_guard_sees_what_it_guards():
    """The patterns match what the adapter really contains (a rename would blind them)."""
    inside = "".join(p.read_text() for p in ADAPTER.glob("*.py"))
    assert IMPORT.search(inside)
    found = set(PRIVATE.findall(inside))
    assert {"_SyncObj__onMessageReceived", "_TcpConnection__processConnection",
            "_Serializer__pid"} <= found


# -- the in-memory Raft ---------------------------------------------------------------------
@pytest.fixture
def raft(tmp_path):
    r = InMemoryRaft(ReplicaConfig(id="m", raft_addr="127.0.0.1:1", peers=[],
                                   data_dir=str(tmp_path), cluster_secret="s" * 16))
    yield r
    r.stop()


def test_both_implementations_have_the_interface(raft):
    methods = [m for m in dir(Raft) if not m.startswith("_")]
    members = methods + list(Raft.__annotations__)
    assert [m for m in members if not hasattr(raft, m)] == []
    assert [m for m in methods if not callable(getattr(RaftReplica, m, None))] == []


def test_proposals_apply_in_order_through_the_state_machine(raft):
    seen = []
    raft.add_apply_listener(lambda batch: seen.extend((i, c.op) for i, c, _ in batch))
    first = raft.propose(UserCreate(name="a", time=1.0)).result(0)
    again = raft.propose(UserCreate(name="a", time=2.0)).result(0)
    read = raft.barrier().result(0)
    assert first.kind == again.kind == read.kind == Outcome.APPLIED
    assert first.result["ok"] and first.result["version"] == 1
    assert again.result["code"] == "conflict" and again.result["version"] == 2
    assert read.result["version"] == 3
    assert seen == [(1, "user.create"), (2, "user.create")], "barriers are not in batches"
    assert raft.store.applied_version() == 3 == raft.status["applied_index"]
    with raft.store.read() as txn:
        assert [k for k, _ in txn.items("users")] == ["a"]


def test_loop_listeners_run_before_the_future_they_precede_resolves(raft):
    async def scenario():
        order = []
        raft.add_apply_listener(lambda batch: order.append("listener"), asyncio.get_running_loop())
        fut = raft.propose_async(UserCreate(name="b", time=1.0))
        fut.add_done_callback(lambda f: order.append("future"))
        assert not fut.done(), "settled on the loop, as the real replica does"
        outcome = await fut
        return order, outcome

    order, outcome = asyncio.run(scenario())
    assert outcome.kind == Outcome.APPLIED and order == ["listener", "future"]


def test_scripted_outcomes_end_proposals_without_applying_them(raft):
    raft.script_outcomes(Outcome(Outcome.NOT_APPLIED, reason="not_leader"),
                         Outcome(Outcome.UNKNOWN, reason="leader_changed"))
    lost = raft.propose(UserCreate(name="c", time=1.0)).result(0)
    unsure = raft.barrier().result(0)
    assert (lost.kind, lost.reason, unsure.kind) == (Outcome.NOT_APPLIED, "not_leader", Outcome.UNKNOWN)
    assert raft.store.applied_version() == 0
    assert raft.propose(UserCreate(name="c", time=1.0)).result(0).kind == Outcome.APPLIED


def test_membership_changes_that_change_nothing_are_refused(raft):
    assert raft.change_membership("add", "127.0.0.1:2").result(0).kind == Outcome.APPLIED
    assert raft.status["members"] == ["127.0.0.1:1", "127.0.0.1:2"]
    refused = raft.change_membership("add", "127.0.0.1:2").result(0)
    assert (refused.kind, refused.reason) == (Outcome.NOT_APPLIED, "request_denied")
    assert raft.change_membership("remove", "127.0.0.1:2").result(0).kind == Outcome.APPLIED
    assert raft.change_membership("remove", "127.0.0.1:2").result(0).kind == Outcome.NOT_APPLIED
