"""Logins in the replicated state (cluster/login_apply.py): single-use, short-lived, pruned."""
from __future__ import annotations

from raftmesh.cluster import commands as c
from raftmesh.cluster import state_machine as sm
from test_state_machine import DictTxn


def start(txn, login_id: str, at: float, version: int, **kw) -> dict:
    cmd = c.LoginStart(id=login_id, nonce="n", code_verifier="v", auth_url="https://idp/a",
                       expires_at=at + 600, machine_key=f"m-{login_id}", node_key="k",
                       hostname="laptop", time=at, **kw)
    return sm.apply(txn, cmd, version)


def complete(txn, login_id: str, at: float, version: int) -> dict:
    return sm.apply(txn, c.LoginComplete(id=login_id, user="alice@example.com", subject="s",
                                         groups=["eng"], node_id=f"n-{login_id}", time=at), version)


def test_a_login_completes_once_and_not_after_it_expired():
    txn = DictTxn()
    assert start(txn, "l1", 1000.0, 1)["ok"] and start(txn, "l2", 1000.0, 2)["ok"]
    done = complete(txn, "l1", 1100.0, 3)
    assert done["ok"] and done["value"]["nodes"][0]["user"] == "alice@example.com"
    again = complete(txn, "l1", 1101.0, 4)
    assert (again["ok"], again["code"], again["status"]) == (False, "login_invalid", 400)
    late = complete(txn, "l2", 1600.0, 5)  # expires_at is 1600
    assert (late["ok"], late["code"]) == (False, "login_invalid")
    assert txn.get("nodes", "n-l2") is None


def test_logins_never_finished_are_pruned_by_later_starts():
    txn = DictTxn()
    for i in range(3):
        assert start(txn, f"old{i}", 1000.0, i + 1)["ok"]
    assert start(txn, "new", 5000.0, 10)["ok"]
    assert [k for k, _ in txn.items("logins")] == ["new"]
    assert [k for k, _ in txn.items("login_index")] == ["machine:m-new"]


def test_a_locked_user_cannot_sign_in():
    txn = DictTxn()
    assert start(txn, "l1", 1000.0, 1)["ok"] and complete(txn, "l1", 1001.0, 2)["ok"]
    assert sm.apply(txn, c.UserLock(name="alice@example.com", reason="stolen", time=1002.0), 3)["ok"]
    assert start(txn, "l2", 1003.0, 4)["ok"]
    refused = complete(txn, "l2", 1004.0, 5)
    assert (refused["ok"], refused["code"], refused["status"]) == (False, "user_locked", 403)
