"""Console sessions as replicated records (cluster/session_apply.py): bounded by the parent
API key, pruned on the replicated clock, the same on every replica."""
from raftmesh.cluster import session_apply, state_machine as sm

from test_state_machine import DictTxn, cmd, run

HOUR = 3600.0


def keys(t=100.0):
    return [cmd("apikey.create", t=t, id="forever", name="a", scopes=["admin"], hash="h"),
            cmd("apikey.create", t=t, id="brief", name="b", scopes=["read"], hash="h",
                expires_at=t + HOUR)]


def session(sid, key_id, t, until):
    return cmd("session.create", t=t, id=sid, key_id=key_id, hash="h" + sid, expires_at=until)


def test_a_session_never_outlives_its_key_and_needs_one():
    txn = DictTxn()
    run(txn, keys())
    r = run(txn, [session("s1", "forever", 100, 100 + 8 * HOUR), session("s2", "brief", 100, 100 + 8 * HOUR),
                  session("s3", "nokey", 100, 200)], start=10)
    assert [x["ok"] for x in r] == [True, True, False] and r[2]["code"] == "not_found"
    assert txn.get("console_sessions", "s1")["expires_at"] == 100 + 8 * HOUR
    assert txn.get("console_sessions", "s2")["expires_at"] == 100 + HOUR  # the key's expiry
    later = sm.apply(txn, session("s4", "brief", 100 + 2 * HOUR, 100 + 10 * HOUR), 20)
    assert not later["ok"] and "expired" in later["message"]


def test_expired_and_orphaned_sessions_are_pruned_at_the_next_sign_in_or_out():
    txn = DictTxn()
    run(txn, keys())
    run(txn, [session("s1", "forever", 100, 200), session("s2", "brief", 100, 100 + 8 * HOUR),
              session("s3", "forever", 100, 100 + 8 * HOUR)], start=10)
    sm.apply(txn, cmd("clock.tick", t=300), 20)  # s1 over, others live
    assert set(txn.tables["console_sessions"]) == {"s1", "s2", "s3"}  # nothing pruned by a tick
    sm.apply(txn, cmd("session.end", t=300, id="s3"), 21)
    assert set(txn.tables["console_sessions"]) == {"s2"}
    sm.apply(txn, cmd("session.create", t=100 + 2 * HOUR, id="s4", key_id="forever", hash="h4",
                      expires_at=100 + 10 * HOUR), 22)
    assert set(txn.tables["console_sessions"]) == {"s4"}  # s2's key expired
    run(txn, [cmd("apikey.create", t=8000, id="other", name="o", scopes=["admin"], hash="h"),
              cmd("apikey.delete", t=8000, id="forever")], start=30)
    sm.apply(txn, cmd("session.end", t=8000, id="unknown"), 40)
    assert txn.tables["console_sessions"] == {}


def test_the_table_is_bounded(monkeypatch):
    monkeypatch.setattr(session_apply, "MAX_SESSIONS", 3)
    txn = DictTxn()
    run(txn, keys())
    run(txn, [session(f"s{i}", "forever", 100, 1000 + i) for i in range(5)], start=10)
    assert set(txn.tables["console_sessions"]) == {"s2", "s3", "s4"}


def test_sign_ins_are_not_audited_and_replicas_agree():
    a, b = DictTxn(), DictTxn()
    commands = keys() + [session("s1", "forever", 100, 200), cmd("session.end", t=150, id="s1")]
    assert run(a, commands) == run(b, commands) and a.tables == b.tables
    assert [e["action"] for _, e in a.items("audit")] == ["apikey.create", "apikey.create"]
