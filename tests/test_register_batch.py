"""Group commit of registrations: a batch entry applies each as if it were its own entry, and
the replica's batcher sends registrations of one loop turn as one entry with one result each."""
import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from nacl.signing import SigningKey

from raftmesh.agent.control_client import ControlClient
from raftmesh.api.group_commit import RegistrationBatcher
from raftmesh.cluster import state_machine as sm
from raftmesh.cluster.commands import Command, Invalid, NodeRegister, NodeRegisterBatch
from raftmesh.cluster.config import ConfigError, ReplicaConfig
from raftmesh.cluster.raft import Outcome
from raftmesh.cluster.raft.in_memory import InMemoryRaft
from raftmesh.proto.routes import REGISTER

from test_agent_register import node_key, preauth
from test_state_machine import DictTxn, cmd, run


def registration(i: int, machine: str | None = None, **args) -> NodeRegister:
    args = {"id": f"n{i}", "name": "box", "machine_key": machine or f"m{i}", "node_key": f"k{i}",
            "preauth_key_id": "k1", **args}
    return NodeRegister(**args, time=100.0 + i, actor=f"machine:m{i}", request_id=f"r{i}")


def key_setup():
    return [cmd("user.create", name="alice"),
            cmd("preauthkey.create", id="k1", user="alice", hash="h", reusable=True, usage_limit=3,
                expires_at=1000.0, tags=[])]


def test_a_batch_applies_each_registration_as_if_it_were_its_own_entry():
    regs = [registration(1), registration(2), registration(3, machine="m1"),  # a machine twice
            registration(4), registration(5),  # the key's fourth use: over its limit of 3
            registration(6, preauth_key_id=None, user="alice")]
    records = [r.record() for r in regs]
    records.insert(2, {"v": 1, "op": "node.register", "args": {"id": "n9"}, "time": 1.0})
    batched, single = DictTxn(), DictTxn()
    run(batched, key_setup())
    run(single, key_setup())
    batch = Command.decode(NodeRegisterBatch(commands=records, time=106.0).encode())
    result = sm.apply(batched, batch, 7)
    alone = [sm.apply(single, Command.from_record(r), 7) for r in records]
    assert result["ok"] and result["value"]["results"] == alone
    assert batched.tables == single.tables, "same nodes, audit chain, idempotency records, clock"
    oks = [r["ok"] for r in alone]
    assert oks == [True, True, False, False, True, False, True]
    assert alone[2]["code"] == "bad_command" and "is required" in alone[2]["message"]
    assert alone[3]["code"] == "conflict" and alone[5]["code"] == "preauth_key_invalid"
    assert [r["value"]["id"] for r in alone if r["ok"]] == ["n1", "n2", "n4", "n6"]


def test_a_batch_holds_only_registrations_and_a_stranger_fails_alone():
    txn = DictTxn()
    run(txn, key_setup())
    stranger = cmd("user.create", name="mallory").record()
    batch = NodeRegisterBatch(commands=[stranger, registration(1).record(), {"v": 2}], time=101.0)
    assert isinstance(batch.registrations[0], Invalid) and isinstance(batch.registrations[2], Invalid)
    first, second, third = sm.apply(txn, batch, 5)["value"]["results"]
    assert first["code"] == "bad_command" and "only node.register" in first["message"]
    assert second["ok"] and third["code"] == "bad_command"
    assert txn.get("users", "mallory") is None


def test_a_replayed_registration_in_a_batch_answers_its_first_result():
    txn = DictTxn()
    run(txn, key_setup())
    first = sm.apply(txn, registration(1), 5)
    again = sm.apply(txn, NodeRegisterBatch(commands=[registration(1).record(),
                                                      registration(2).record()]), 6)
    replay, new = again["value"]["results"]
    assert replay["replayed"] and replay["value"] == first["value"] and new["ok"]


@pytest.fixture
def raft(tmp_path):
    r = InMemoryRaft(ReplicaConfig(id="m", raft_addr="127.0.0.1:1", peers=[],
                                   data_dir=str(tmp_path), cluster_secret="s" * 16))
    for c in key_setup():
        assert r.propose(c).result(10).result["ok"]
    yield r
    r.stop()


def test_registrations_of_one_loop_turn_are_one_entry_each_with_its_own_outcome(raft):
    published = []
    raft.add_apply_listener(published.extend)
    before = raft.store.applied_version()

    async def register_together():
        batcher = RegistrationBatcher(raft, 256, lambda: True)
        return await asyncio.gather(*(batcher.propose(r) for r in
                                      (registration(1), registration(2, machine="m1"), registration(3))))

    outcomes = asyncio.run(register_together())
    assert raft.store.applied_version() == before + 1, "one Raft entry"
    assert all(o.kind == Outcome.APPLIED for o in outcomes)
    assert [o.result["ok"] for o in outcomes] == [True, False, True]
    assert outcomes[1].result["code"] == "conflict"
    assert [o.result["value"]["id"] for o in outcomes if o.result["ok"]] == ["n1", "n3"]
    # listeners (the netmap feed) get each registration, as if it had been its own entry
    assert [(v, c.id) for v, c, _ in published] == [(before + 1, "n1"), (before + 1, "n2"),
                                                    (before + 1, "n3")]


def test_a_lone_registration_stays_an_ordinary_entry_and_batches_are_bounded(raft):
    published = []
    raft.add_apply_listener(published.extend)
    before = raft.store.applied_version()

    async def register(regs, limit):
        batcher = RegistrationBatcher(raft, limit, lambda: True)
        return await asyncio.gather(*(batcher.propose(r) for r in regs))

    lone = asyncio.run(register([registration(1)], 4))
    assert lone[0].result["ok"] and raft.store.applied_version() == before + 1
    with raft.store.read() as txn:
        assert txn.get("nodes", "n1") is not None
    asyncio.run(register([registration(i, preauth_key_id=None, user="alice") for i in range(2, 7)], 2))
    assert raft.store.applied_version() == before + 4, "5 registrations, at most 2 an entry"
    asyncio.run(register([registration(i, preauth_key_id=None, user="alice") for i in range(7, 10)], 1))
    assert raft.store.applied_version() == before + 7, "register_batch = 1: an entry each"
    assert [c.id for _, c, _ in published] == [f"n{i}" for i in range(1, 10)]


def test_while_batches_are_held_back_each_registration_is_its_own_entry(raft):
    """A member's release may not know node.register_batch (api/command_gate.py)."""
    before = raft.store.applied_version()

    async def register_together():
        batcher = RegistrationBatcher(raft, 256, lambda: False)
        return await asyncio.gather(*(batcher.propose(registration(i, preauth_key_id=None, user="alice"))
                                      for i in range(1, 5)))

    outcomes = asyncio.run(register_together())
    assert [o.result["ok"] for o in outcomes] == [True] * 4
    assert raft.store.applied_version() == before + 4, "one entry each"


def test_a_batch_that_was_not_applied_is_reported_so_to_each(raft):
    raft.script_outcomes(Outcome(Outcome.UNKNOWN, reason="leader lost"))

    async def register_together():
        batcher = RegistrationBatcher(raft, 256, lambda: True)
        return await asyncio.gather(batcher.propose(registration(1)), batcher.propose(registration(2)))

    outcomes = asyncio.run(register_together())
    assert [o.kind for o in outcomes] == [Outcome.UNKNOWN, Outcome.UNKNOWN]


def test_registrations_acknowledged_together_survive_sigkill_of_every_replica(make_cluster):
    """Registered means committed: every agent told so finds its node after all replicas
    were SIGKILLed and restarted, whichever replica it asks."""
    c = make_cluster(3)
    key = preauth(c, reusable=True)
    follower = next(r for r in c.replicas if r is not c.leader())
    machines = [SigningKey.generate() for _ in range(48)]

    def register(machine, replica):
        return ControlClient([replica.api_url], machine).call(
            "POST", REGISTER, {"node_key": node_key(), "hostname": "batched", "auth_key": key})

    with ThreadPoolExecutor(16) as pool:
        acked = list(pool.map(lambda m: register(m, follower)["node"]["id"], machines))
    assert len(set(acked)) == len(machines)
    for r in c.replicas:
        c.kill(r)
    c.start_all()
    c.wait_ready(timeout=30)
    for i, machine in enumerate(machines):
        assert register(machine, c.replicas[i % 3])["node"]["id"] == acked[i]


@pytest.mark.parametrize("size", [0, 257])
def test_a_register_batch_setting_out_of_range_is_refused_naming_it(tmp_path, size):
    config = ReplicaConfig(id="m", raft_addr="127.0.0.1:1", peers=[], data_dir=str(tmp_path),
                           cluster_secret="s" * 16, register_batch=size)
    with pytest.raises(ConfigError, match=r"register_batch must be in \[1, 256\]"):
        config.validate()
