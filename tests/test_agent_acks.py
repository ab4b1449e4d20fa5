"""Deferred, coalesced acks (agent/acks.py): pure, so checked exhaustively here."""
from raftmesh.agent.acks import MAX_LISTED, PendingAcks


def test_first_apply_starts_the_round_and_later_ones_join_it():
    p = PendingAcks()
    assert not p.due(100.0) and p.take(100.0) is None
    p.add(5, 10.0, delay=1.0)
    p.add(7, 10.4, delay=9.0)  # joins the round: its delay is ignored
    assert not p.due(10.99) and p.due(11.0)
    assert p.take(11.0) == {"version": 7, "applied": [[5, 1.0], [7, 0.6]]}
    assert p.due_at is None and not p.due(1e9) and p.take(12.0) is None


def test_a_burst_is_bounded_to_the_newest_versions():
    p = PendingAcks()
    for v in range(1, MAX_LISTED + 11):
        p.add(v, float(v), delay=0.5)
    body = p.take(1000.0)
    assert body["version"] == MAX_LISTED + 10 and len(body["applied"]) == MAX_LISTED
    assert body["applied"][0][0] == 11


def test_clear_forgets_a_round_of_an_ended_stream():
    p = PendingAcks()
    p.add(3, 1.0, delay=0.5)
    p.clear()
    assert not p.due(5.0) and p.take(5.0) is None
