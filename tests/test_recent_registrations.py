"""What a replica remembers of the machines registered through it (api/recent_registrations.py)."""
from raftmesh.api.recent_registrations import RecentRegistrations


def test_a_registration_is_taken_once_and_only_while_recent():
    recent = RecentRegistrations(seconds=10, limit=3)
    recent.add("m1", 5, now=100.0)
    assert recent.take("m1", now=101.0) == 5
    assert recent.take("m1", now=101.0) is None, "a later stream is not the first"
    recent.add("m2", 6, now=100.0)
    assert recent.take("m2", now=110.5) is None, "too old: a barrier, as for any stream"
    assert recent.take("unknown", now=100.0) is None


def test_memory_is_bounded_by_count_and_age():
    recent = RecentRegistrations(seconds=10, limit=3)
    for i in range(5):
        recent.add(f"m{i}", i, now=100.0 + i)
    assert len(recent) == 3 and recent.take("m0", now=105.0) is None
    recent.add("m9", 9, now=200.0)  # everything else is older than 10 s
    assert len(recent) == 1
    recent.add("m9", 10, now=201.0)  # registered again: the newer version
    assert recent.take("m9", now=201.0) == 10
