"""The WGL linearizability checker: textbook histories, randomised histories that are
linearizable by construction (and their one-read mutations), the budget, and JSON lines."""
from __future__ import annotations

import itertools
import math
import random

import pytest

from raftmesh.chaos import history as h
from raftmesh.chaos.history import Operation
from raftmesh.chaos.linearizability import check, check_partition
from raftmesh.chaos.models import CounterModel, ExistenceModel, RegisterModel, SetModel

_ids = itertools.count()


def op(f, value=None, invoke=0.0, complete=None, status="ok", result=None, key="user:alice", process=0):
    return Operation(process=process, op_id=next(_ids), key=key, f=f, value=value,
                     invoke=invoke, complete=complete, status=status, result=result)


def w(value, invoke, complete, status="ok", **kw):
    return op("write", value, invoke, complete, status, **kw)


def r(result, invoke, complete, **kw):
    return op("read", None, invoke, complete, "ok", result, **kw)


def assert_witness(res, model):
    """The witness must hold every ok op, no fail op, respect real time and replay in the model."""
    for part in res.partitions.values():
        order = part.linearization
        assert all(o.status != "fail" for o in order)
        state = model.init()
        for o in order:
            ok, state = model.step(state, o)
            assert ok, o
        for i, a in enumerate(order):
            for b in order[i + 1:]:
                assert not b.deadline < a.invoke, f"{b} placed after {a} but completed before it began"
        assert part.state == state


# --- textbook histories ----------------------------------------------------------------

def test_concurrent_reads_see_old_and_new_value():
    hist = [w(1, 0, 3, process=0), r(1, 1, 4, process=1), r(None, 2, 5, process=2)]
    res = check(hist, RegisterModel())
    assert res.ok and res.verdict == "ok"
    assert res.partitions["user:alice"].result == "ok"
    assert_witness(res, RegisterModel())


def test_touching_intervals_count_as_concurrent():
    assert check([w(1, 0, 1), r(None, 1, 2)], RegisterModel()).ok


def test_stale_read_after_completed_write_fails():
    hist = [w(1, 0, 1), w(2, 2, 3), r(1, 4, 5)]
    res = check(hist, RegisterModel())
    assert not res.ok and res.verdict == "fail"
    part = res.partitions["user:alice"]
    assert part.result == "fail: not linearizable"
    assert part.stuck == hist[2]
    assert [o.value for o in part.linearization] == [1, 2] and part.state == 2


def test_reads_in_impossible_order_fail():
    # Once a read saw the new value, a later read cannot see the old one again.
    hist = [w(1, 0, 10), r(1, 1, 2, process=1), r(None, 3, 4, process=1)]
    assert check(hist, RegisterModel()).verdict == "fail"


def test_unknown_write_assumed_applied_explains_later_read():
    assert check([w(1, 0, None, "unknown"), r(1, 5, 6)], RegisterModel()).ok
    # A recorded completion (a client timeout) bounds nothing: it may apply much later.
    assert check([w(1, 0, 1, "unknown"), r(None, 2, 3), r(1, 50, 51)], RegisterModel()).ok


def test_unknown_write_assumed_not_applied_explains_later_reads():
    hist = [w(1, 0, 1), w(2, 2, None, "unknown"), r(1, 3, 4), w(3, 5, 6), r(3, 7, 8)]
    res = check(hist, RegisterModel())
    assert res.ok
    assert_witness(res, RegisterModel())
    order = res.partitions["user:alice"].linearization
    assert hist[1] not in order[:order.index(hist[2])]  # never before the read of 1


def test_unknown_write_cannot_be_seen_before_its_invoke():
    assert check([r(2, 0, 1), w(2, 2, None, "unknown")], RegisterModel()).verdict == "fail"


def test_fail_op_is_ignored():
    assert check([w(1, 0, 1), w(2, 2, 3, "fail"), r(1, 4, 5)], RegisterModel()).ok
    assert not check([w(1, 0, 1), w(2, 2, 3, "fail"), r(2, 4, 5)], RegisterModel()).ok


def test_lost_write_is_reported_with_evidence():
    lost = w("b", 2, 3, process=1)
    hist = [w("a", 0, 1), lost, r("a", 4, 5, process=2), r("a", 6, 7, process=2)]
    res = check(hist, RegisterModel())
    assert not res.ok
    [part] = res.failures
    assert part.key == "user:alice"
    assert lost in part.linearization and part.state == "b"
    assert part.stuck == hist[2]
    assert hist[2] in part.unlinearized
    text = res.explain()
    for needle in ("user:alice", "not linearizable", "write('b')", "-> 'a'", "4.000000, 5.000000",
                   "impossible in this state"):
        assert needle in text, (needle, text)


def test_violation_on_one_key_is_not_hidden_by_others():
    hist = []
    for k in ("user:alice", "user:bob", "user:carol"):
        hist += [w(k, 0, 1, key=k), r(k, 2, 3, key=k)]
    # Seen only if keys are separate objects: bob's write must not explain mallory's read.
    hist += [w("x", 0, 1, key="user:bob"), r("x", 5, 6, key="user:mallory")]
    res = check(hist, RegisterModel())
    assert res.verdict == "fail"
    assert [p.key for p in res.failures] == ["user:mallory"]
    assert all(res.partitions[k].ok for k in ("user:alice", "user:bob", "user:carol"))
    assert set(res.partitions) == {"user:alice", "user:bob", "user:carol", "user:mallory"}


def test_per_key_models_and_existence_semantics():
    hist = [op("create", None, 0, 1, result="created", key="node:a"),
            op("create", None, 2, 3, result="exists", key="node:a"),  # the API's 409, recorded ok
            op("read", None, 4, 5, result=True, key="node:a"),
            op("delete", None, 6, 7, result="deleted", key="node:a"),
            op("delete", None, 8, 9, result="absent", key="node:a"),
            w(5, 0, 1, key="cfg:mtu"), r(5, 2, 3, key="cfg:mtu")]
    model = lambda key: ExistenceModel() if key.startswith("node:") else RegisterModel()  # noqa: E731
    assert check(hist, model).ok
    bad = hist[:1] + [op("create", None, 2, 3, result="created", key="node:a")]
    assert check(bad, ExistenceModel()).verdict == "fail"


def _explosive(n):
    writes = [w(i, 0, 100, process=i) for i in range(n)]
    return writes + [r("never written", 200, 201, process=n)]


def test_budget_exceeded_reports_unknown_not_ok():
    res = check(_explosive(10), RegisterModel(), max_states=50)
    part = res.partitions["user:alice"]
    assert part.result == "unknown: budget exceeded" and part.explored == 50
    assert not res.ok and res.verdict == "unknown"
    assert "budget exceeded" in res.explain()
    # Same for a history that is linearizable: an unfinished search never claims success.
    fine = [w(i, 0, 100, process=i) for i in range(10)] + [r(3, 200, 201)]
    assert check(fine, RegisterModel(), max_states=20).verdict == "unknown"
    # With room to finish, the verdicts are definite.
    assert check(_explosive(10), RegisterModel()).verdict == "fail"
    assert check(fine, RegisterModel()).ok


def test_unknown_ops_that_cannot_matter_are_pruned():
    # 40 timed-out reads and late unknown writes would blow a 30-state budget if searched.
    hist = [w(1, 0, 1)] + [op("read", None, 0.5, None, "unknown") for _ in range(40)]
    hist += [w(i, 5, None, "unknown") for i in range(40)] + [r(1, 2, 3)]
    assert check(hist, RegisterModel(), max_states=30).ok


def test_other_models():
    adds = [op("add", 2, 0, 1), op("add", None, 0, 1, process=1), op("add", 5, 0, None, "unknown")]
    assert check(adds + [op("read", None, 2, 3, result=3)], CounterModel()).ok
    assert check(adds + [op("read", None, 2, 3, result=8)], CounterModel()).ok
    assert not check(adds + [op("read", None, 2, 3, result=2)], CounterModel()).ok
    sets = [op("add", "a", 0, 1), op("add", "b", 0, 1), op("read", None, 2, 3, result=["b", "a"])]
    assert check(sets, SetModel()).ok
    assert not check(sets[:2] + [op("read", None, 2, 3, result=["a"])], SetModel()).ok
    cas = [w(1, 0, 1), op("cas", [1, 2], 2, 3, result=True), op("cas", [1, 3], 4, 5, result=False), r(2, 6, 7)]
    assert check(cas, RegisterModel()).ok


def test_model_rejects_unsupported_operation():
    with pytest.raises(ValueError, match="unsupported operation 'frobnicate'"):
        check([op("frobnicate", None, 0, 1)], RegisterModel())


def test_operation_validation():
    with pytest.raises(ValueError, match="complete time"):
        w(1, 0, None, "ok")
    with pytest.raises(ValueError, match="before it is invoked"):
        w(1, 2, 1)
    with pytest.raises(ValueError, match="status"):
        w(1, 0, 1, "info")
    assert w(1, 0, 1, "unknown").deadline == math.inf


def test_empty_and_all_failed_histories_are_linearizable():
    assert check([], RegisterModel()).ok
    assert check_partition("k", [w(1, 0, 1, "fail")], RegisterModel()).ok


# --- JSON lines ------------------------------------------------------------------------

def test_jsonl_round_trip(tmp_path):
    hist = [w({"mtu": 1420, "peers": ["a", "b"]}, 0.125, 0.5, key="ключ:ü"),
            w(2, 0.25, None, "unknown"), w(3, 0.3, 0.9, "fail"),
            op("cas", [1, 2], 1.0, 2.0, result=True, process="client-7"), r(None, 1.5, 1.75)]
    path = tmp_path / "history.jsonl"
    h.save(hist, path)
    assert h.load(path) == hist
    assert h.loads(h.dumps(hist)) == hist
    assert check(h.load(path), RegisterModel()).verdict == check(hist, RegisterModel()).verdict


def test_jsonl_errors_name_the_line():
    good = h.dumps([w(1, 0, 1)])
    with pytest.raises(ValueError, match="line 3: missing field"):
        h.loads(good + "\n" + '{"key": "k"}\n')
    with pytest.raises(ValueError, match="line 2"):
        h.loads(good + "{not json\n")


# --- randomised: linearizable by construction ------------------------------------------

def generate(rng, kind, keys=("k0", "k1", "k2"), n=40, window=2.5, unique=False):
    """Run a real sequential execution per key, then wrap each op's linearization point in
    a random interval. Some ops fail (not applied) or end unknown (applied or not)."""
    ops, fresh = [], itertools.count(100)
    free_at: dict[int, float] = {}  # process -> when its last op completed
    for key in keys:
        state, t = (None if kind == "register" else False), window
        for _ in range(n):
            t += rng.uniform(0.05, 1.0)
            f, value = _pick(rng, kind, fresh, unique)
            invoke, complete = t - rng.uniform(0, window), t + rng.uniform(0, window)
            roll = rng.random()
            status = "fail" if roll < 0.08 else "unknown" if roll < 0.18 else "ok"
            applied = status == "ok" or (status == "unknown" and rng.random() < 0.5)
            result = None
            if applied:
                state, result = _apply(kind, state, f, value)
            if status == "unknown":
                complete = rng.choice([None, complete])
            process = next((p for p, done in free_at.items() if done < invoke), len(free_at))
            free_at[process] = math.inf if status == "unknown" else complete  # crashed clients retire
            ops.append(Operation(process=process, op_id=len(ops), key=key, f=f, value=value,
                                 invoke=invoke, complete=complete, status=status, result=result))
    rng.shuffle(ops)  # the checker must not rely on history order
    return ops


def _pick(rng, kind, fresh, unique):
    if kind == "register":
        if rng.random() < 0.5:
            return "read", None
        return "write", next(fresh) if unique else rng.randint(0, 3)
    return rng.choice(["create", "delete", "read"]), None


def _apply(kind, state, f, value):
    if kind == "register":
        return (value, None) if f == "write" else (state, state)
    if f == "read":
        return state, state
    if f == "create":
        return True, "exists" if state else "created"
    return False, "deleted" if state else "absent"


MODELS = {"register": RegisterModel, "existence": ExistenceModel}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_random_linearizable_histories_pass_and_impossible_reads_fail(kind):
    model = MODELS[kind]()
    for seed in range(60):
        rng = random.Random(seed)
        hist = generate(rng, kind)
        res = check(hist, model)
        assert res.ok, (seed, res.explain())
        assert_witness(res, model)
        assert h.loads(h.dumps(hist)) == hist
        reads = [o for o in hist if o.f == "read" and o.status == "ok"]
        victim = rng.choice(reads)
        mutated = [o if o is not victim else _with_result(o, "impossible") for o in hist]
        res = check(mutated, model)
        assert [p.key for p in res.failures] == [victim.key], (seed, res.explain())
        assert any(o.op_id == victim.op_id for o in res.failures[0].unlinearized)


def test_random_future_and_stale_reads_fail():
    """Subtler mutations with unique written values: a read returning a value written only
    after it completed, or one overwritten before it began."""
    model, tried = RegisterModel(), 0
    for seed in range(60):
        rng = random.Random(seed)
        hist = generate(rng, "register", keys=("k",), unique=True)
        writes = [o for o in hist if o.f == "write" and o.status != "fail"]
        oks = [o for o in writes if o.status == "ok"]
        reads = [o for o in hist if o.f == "read" and o.status == "ok"]
        future = [(rd, o.value) for rd in reads for o in writes if o.invoke > rd.complete]
        stale = [(rd, a.value) for rd in reads for a in oks for b in oks
                 if a.complete < b.invoke and b.complete < rd.invoke]
        for read, impossible in [rng.choice(c) for c in (future, stale) if c]:
            tried += 1
            mutated = [o if o is not read else _with_result(o, impossible) for o in hist]
            assert check(mutated, model).verdict == "fail", (seed, read, impossible)
    assert tried > 100


def _with_result(o, result):
    return Operation(**{**h.to_dict(o), "result": result})
