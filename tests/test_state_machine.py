"""The state machine as a pure function: determinism, rejection atomicity, audit, idempotency."""
import ipaddress
import os

import pytest

from raftmesh.cluster import state_machine as sm
from raftmesh.cluster.commands import Command, CommandError, build
from raftmesh.storage.audit_chain import verify


class DictTxn:
    """In-memory Txn with the same ordering semantics as LMDB."""

    def __init__(self):
        self.tables: dict[str, dict] = {}

    def get(self, table, key):
        return self.tables.get(table, {}).get(key)

    def put(self, table, key, value):
        self.tables.setdefault(table, {})[key] = value

    def delete(self, table, key):
        self.tables.get(table, {}).pop(key, None)

    def items(self, table, start=""):
        t = self.tables.get(table, {})
        for k in sorted(t):
            if k >= start:
                yield k, t[k]


def run(txn, commands, start=1):
    return [sm.apply(txn, c, start + i) for i, c in enumerate(commands)]


def cmd(op, t=100.0, actor="apikey:a", rid=None, **args):
    return build(op, args, time=t, actor=actor, request_id=rid)


def setup_commands():
    return [
        cmd("user.create", name="alice"),
        cmd("preauthkey.create", id="k1", user="alice", hash="h", reusable=True, usage_limit=2,
            expires_at=1000.0, tags=[]),
        cmd("node.register", id="n1", name="laptop", machine_key="m1", node_key="nk1",
            preauth_key_id="k1"),
        cmd("node.register", id="n2", name="laptop", machine_key="m2", node_key="nk2",
            preauth_key_id="k1"),
        cmd("node.register", id="n3", name="phone", machine_key="m3", node_key="nk3",
            user="alice"),
    ]


def test_same_commands_same_state():
    a, b = DictTxn(), DictTxn()
    ra, rb = run(a, setup_commands()), run(b, setup_commands())
    assert ra == rb and a.tables == b.tables
    assert all(r["ok"] for r in ra), ra


def test_nodes_get_unique_names_and_addresses():
    txn = DictTxn()
    results = run(txn, setup_commands())
    nodes = [r["value"] for r in results[2:]]
    assert [n["name"] for n in nodes] == ["laptop", "laptop-2", "phone"]
    v4 = [n["ipv4"] for n in nodes]
    assert len(set(v4)) == 3 and all(ipaddress.ip_address(a) in ipaddress.ip_network("100.64.0.0/10") for a in v4)
    assert all(ipaddress.ip_address(n["ipv6"]) in ipaddress.ip_network("fd7a:115c:a1e0::/48") for n in nodes)
    assert nodes[0]["approved"] and nodes[1]["approved"] and not nodes[2]["approved"]


def test_address_of_deleted_node_is_reused_only_after_wraparound():
    txn = DictTxn()
    run(txn, setup_commands())
    first = txn.get("nodes", "n1")["ipv4"]
    r = run(txn, [cmd("node.delete", id="n1"),
                  cmd("node.register", id="n4", name="x", machine_key="m4", node_key="k", user="alice")], 10)
    assert r[1]["value"]["ipv4"] != first
    assert txn.get("node_ips", first) is None


def test_used_up_and_expired_preauth_keys_are_refused_without_change():
    txn = DictTxn()
    run(txn, setup_commands())
    before = {t: dict(v) for t, v in txn.tables.items()}
    r = sm.apply(txn, cmd("node.register", id="n9", name="x", machine_key="m9", node_key="k",
                          preauth_key_id="k1"), 20)
    assert not r["ok"] and r["code"] == "preauth_key_invalid" and "used up" in r["message"]
    assert txn.tables == before, "a rejected command changes nothing"
    run(txn, [cmd("preauthkey.create", id="k2", user="alice", hash="h", expires_at=50.0)], 21)
    r = sm.apply(txn, cmd("node.register", id="n9", name="x", machine_key="m9", node_key="k",
                          preauth_key_id="k2"), 22)
    assert r["code"] == "preauth_key_invalid" and "expired" in r["message"]


def test_user_with_nodes_cannot_be_deleted():
    txn = DictTxn()
    run(txn, setup_commands())
    r = sm.apply(txn, cmd("user.delete", name="alice"), 30)
    assert r["code"] == "conflict" and r["status"] == 409


def test_audit_chain_covers_every_change_and_detects_tampering():
    txn = DictTxn()
    run(txn, setup_commands())
    audit = [v for _, v in txn.items("audit")]
    assert len(audit) >= 5
    assert verify(audit) == (True, f"{len(audit)} entries verified")
    assert all("hash" not in (e["after"] or {}) for e in audit), "no stored secret in the audit log"
    edited = [dict(e) for e in audit]
    edited[2]["actor"] = "someone-else"
    assert not verify(edited)[0]
    assert not verify(audit[:2] + audit[3:])[0]
    assert not verify([audit[1], audit[0]] + audit[2:])[0]


def test_idempotent_replay_returns_first_result_and_changes_nothing():
    txn = DictTxn()
    first = sm.apply(txn, cmd("user.create", rid="req-1", name="bob"), 1)
    snapshot = {t: dict(v) for t, v in txn.tables.items()}
    again = sm.apply(txn, cmd("user.create", rid="req-1", name="bob"), 2)
    assert again["replayed"] and again["value"] == first["value"] and again["version"] == 1
    assert txn.tables == snapshot


def test_idempotency_records_expire_by_command_time():
    txn = DictTxn()
    sm.apply(txn, cmd("user.create", t=0.0, rid="old", name="u1"), 1)
    sm.apply(txn, cmd("user.create", t=sm.IDEMPOTENCY_TTL + 10, rid="new", name="u2"), 2)
    assert txn.get("idempotency", "old") is None and txn.get("idempotency", "new") is not None


def test_unknown_and_malformed_commands_are_rejected():
    txn = DictTxn()
    assert sm.apply(txn, cmd("nope"), 1)["code"] == "unknown_command"
    assert sm.apply(txn, build("user.create", {}), 2)["code"] == "bad_command"
    assert txn.tables == {}
    with pytest.raises(CommandError):
        Command.decode(b"not json")
    with pytest.raises(CommandError):
        Command.decode(b'{"v": 99, "op": "x"}')


def test_command_round_trip():
    c = cmd("user.create", rid="r", name="x")
    assert Command.decode(c.encode()) == c


def test_policy_versions_are_all_kept_and_expected_version_is_checked():
    txn = DictTxn()
    r = run(txn, [cmd("policy.set", text="{}"), cmd("policy.set", text='{"acls": []}')])
    assert [x["value"]["version"] for x in r] == [1, 2]
    assert len(list(txn.items("policy_versions"))) == 2
    bad = sm.apply(txn, cmd("policy.set", text="{}", expected_version=1), 3)
    assert bad["code"] == "version_conflict"
    compiled = {"format": 1, "groups": {}, "tagOwners": {}, "hosts": {}, "acls": []}
    run(txn, [cmd("policy.set", text="{}", compiled=compiled)])
    assert txn.get("policy_versions", f"{3:010d}")["compiled"] == compiled
    assert "compiled" not in txn.get("policy_versions", f"{2:010d}")  # a text-only entry


def test_the_last_admin_key_cannot_be_deleted():
    txn = DictTxn()
    run(txn, [cmd("apikey.bootstrap", id="a1", name="boot", hash="h", scopes=["admin"]),
              cmd("apikey.create", id="r1", name="ro", hash="h", scopes=["read"])])
    r = sm.apply(txn, cmd("apikey.delete", id="a1"), 3)
    assert r["code"] == "conflict" and "last unexpired admin key" in r["message"]
    # an expired admin key does not count as another way in
    run(txn, [cmd("apikey.create", id="old", name="old", hash="h", scopes=["admin"],
                  expires_at=50.0)], 3)
    assert sm.apply(txn, cmd("apikey.delete", id="a1"), 4)["code"] == "conflict"
    run(txn, [cmd("apikey.create", id="a2", name="second", hash="h", scopes=["admin"])], 4)
    assert sm.apply(txn, cmd("apikey.delete", id="a1"), 5)["ok"]
    assert sm.apply(txn, cmd("apikey.delete", id="r1"), 6)["ok"]


def test_presence_sessions_sweep_clock_and_reauthentication():
    txn = DictTxn()
    run(txn, setup_commands())
    node = lambda i: txn.get("nodes", i)
    r = sm.apply(txn, cmd("node.presence", t=101, replica="r1", changes=[
        {"id": "n1", "online": True, "session": "s1"}, {"id": "gone", "online": True, "session": "x"},
        {"id": "n2", "online": True, "session": "s2"}]), 10)
    assert [n["id"] for n in r["value"]["nodes"]] == ["n1", "n2"]
    assert node("n1")["online"] and node("n1")["stream_replica"] == "r1"
    # n1 reconnected on r2 before r1 noticed its old stream closing: the late close is ignored
    sm.apply(txn, cmd("node.presence", t=102, replica="r2", changes=[
        {"id": "n1", "online": True, "session": "s3"}]), 11)
    sm.apply(txn, cmd("node.presence", t=103, replica="r1", changes=[
        {"id": "n1", "online": False, "session": "s1"}, {"id": "n2", "online": False, "session": "s2"}]), 12)
    assert node("n1")["online"] and node("n1")["stream_replica"] == "r2"
    assert not node("n2")["online"] and node("n2")["last_seen"] == 103
    # r2 restarts: its streams are gone
    r = sm.apply(txn, cmd("node.presence_sweep", t=104, replica="r2"), 13)
    assert [n["id"] for n in r["value"]["nodes"]] == ["n1"] and not node("n1")["online"]
    assert node("n1")["last_seen"] == 104  # alive until the sweep, as far as anyone knows
    # the replicated clock follows successful commands only
    assert sm.clock(txn) == 104
    sm.apply(txn, cmd("node.approve", t=500, id="nope"), 14)
    assert sm.clock(txn) == 104
    sm.apply(txn, cmd("clock.tick", t=200), 15)
    assert sm.clock(txn) == 200
    # an expired node comes back with a pre-auth key of its own user
    sm.apply(txn, cmd("node.expire", t=201, id="n1"), 16)
    assert node("n1")["expired"]
    r = sm.apply(txn, cmd("node.reauthenticate", t=202, id="n1", preauth_key_id="k1"), 17)
    assert not r["ok"] and "used up" in r["message"]  # k1's two uses are spent
    sm.apply(txn, cmd("preauthkey.create", t=202, id="k2", user="alice", hash="h", reusable=False,
                      tags=[], expires_at=1000.0), 18)
    r = sm.apply(txn, cmd("node.reauthenticate", t=202, id="n1", preauth_key_id="k2",
                          node_key="nk9", key_expiry=900.0), 19)
    assert r["ok"], r
    assert not node("n1")["expired"] and node("n1")["node_key"] == "nk9"
    assert txn.get("preauth_keys", "k2")["used"] == 1
    sm.apply(txn, cmd("user.create", t=203, name="bob"), 20)
    sm.apply(txn, cmd("preauthkey.create", t=203, id="kb", user="bob", hash="h", reusable=True,
                      tags=[], expires_at=1000.0), 21)
    r = sm.apply(txn, cmd("node.reauthenticate", t=204, id="n1", preauth_key_id="kb"), 22)
    assert not r["ok"] and r["code"] == "forbidden"


def test_node_names_stay_unique_through_renames_and_deletes_without_scanning():
    txn = DictTxn()
    run(txn, setup_commands())  # n1 "laptop", n2 "laptop-2", n3 "phone"
    names = lambda: {n["name"] for _, n in txn.items("nodes")}
    assert names() == {"laptop", "laptop-2", "phone"}
    r = sm.apply(txn, cmd("node.update", id="n3", name="laptop"), 10)
    assert not r["ok"] and r["code"] == "conflict"
    assert sm.apply(txn, cmd("node.update", id="n1", name="desk"), 11)["ok"]
    assert sm.apply(txn, cmd("node.update", id="n3", name="laptop"), 12)["ok"]  # freed by the rename
    sm.apply(txn, cmd("node.delete", id="n2"), 13)
    r = sm.apply(txn, cmd("node.register", t=101, id="n4", name="laptop", machine_key="m4",
                          node_key="nk4", user="alice"), 14)
    assert r["value"]["name"] == "laptop-3"  # after the last suffix handed out
    assert dict(txn.items("node_names")) == {"#laptop": 3, "desk": "n1", "laptop": "n3",
                                              "laptop-3": "n4"}


def test_replicas_applying_the_same_log_store_identical_bytes(tmp_path):
    """Stored values keep insertion order (no sort_keys): replicas still agree byte for byte,
    because every replica decodes the same command bytes and handlers build records in a
    fixed order. Proposers may build args in any order; the log carries one encoding."""
    from raftmesh.storage.state_store import StateStore
    commands = setup_commands() + [
        build("node.update", {"tags": ["tag:b", "tag:a"], "id": "n1"}, time=101.0, actor="x"),
        build("node.update", {"id": "n2", "name": "renamed"}, time=102.0, actor="x",
              request_id="r1"),
        build("user.create", {"display_name": "Bob", "name": "bob"}, time=103.0),
    ]
    log = [c.encode() for c in commands]
    # a second proposer that built the same args in another order encodes the same bytes
    assert [build(c.op, dict(reversed(list(c.args().items()))), time=c.time, actor=c.actor,
                  request_id=c.request_id).encode() for c in commands] == log
    digests = []
    for name in ("a", "b"):
        store = StateStore(str(tmp_path / name))
        for index, payload in enumerate(log, 1):
            txn = store.write_txn()
            assert sm.apply(txn, Command.decode(payload), index)["ok"]
            store.set_applied_version(txn, index)
            if index % 3 == 0:
                store.commit()
        store.commit()
        digests.append(store.digest())
        with store.read() as txn:
            audit = [e for _, e in txn.items("audit")]
        assert verify(audit) == (True, f"{len(audit)} entries verified")
        store.close()
    assert digests[0] == digests[1]


def test_meta_cache_follows_writes_deletes_and_snapshot_installs(tmp_path):
    from raftmesh.storage.state_store import StateStore
    store = StateStore(str(tmp_path / "s"))
    txn = store.write_txn()
    assert txn.get("meta", "clock") is None
    txn.put("meta", "clock", 5.0)
    assert store.write_txn().get("meta", "clock") == 5.0
    store.commit()
    pinned = store.pin()
    fd = os.open(str(tmp_path / "copy.mdb"), os.O_WRONLY | os.O_CREAT, 0o600)
    store.copy_pinned(fd, pinned)
    os.close(fd)
    pinned.abort()
    txn = store.write_txn()
    txn.put("meta", "clock", 9.0)
    txn.delete("meta", "audit_head")
    assert txn.get("meta", "clock") == 9.0 and txn.get("meta", "audit_head") is None
    store.commit()
    with store.read() as r:
        assert r.get("meta", "clock") == 9.0
    store.replace_with(str(tmp_path / "copy.mdb"))  # as a snapshot install does
    assert store.write_txn().get("meta", "clock") == 5.0
    store.close()


def test_removing_a_member_marks_the_nodes_that_streamed_from_it_offline():
    """A removed replica never restarts to sweep its own streams."""
    txn = DictTxn()
    run(txn, setup_commands())
    sm.apply(txn, cmd("member.announce", id="r3", raft_addr="127.0.0.1:1", api_url="http://x"), 10)
    sm.apply(txn, cmd("node.presence", t=101, replica="r3", changes=[
        {"id": "n1", "online": True, "session": "s1"}]), 11)
    sm.apply(txn, cmd("node.presence", t=101, replica="r1", changes=[
        {"id": "n2", "online": True, "session": "s2"}]), 12)
    r = sm.apply(txn, cmd("member.remove", t=102, id="r3"), 13)
    assert r["ok"] and r["value"]["member"]["id"] == "r3"
    assert [n["id"] for n in r["value"]["nodes"]] == ["n1"]
    assert not txn.get("nodes", "n1")["online"] and txn.get("nodes", "n2")["online"]
    assert txn.get("members", "r3") is None
    r = sm.apply(txn, cmd("member.remove", t=103, id="r3"), 14)
    assert not r["ok"] and r["code"] == "not_found" and txn.get("nodes", "n2")["online"]
