"""DurableJournal: durable appends, Raft's conflict-only truncation, torn-tail recovery."""
import logging
import os

import pytest

from raftmesh.storage.journal import _MAGIC, PREALLOCATE, DurableJournal, JournalError, _encode


def entries(j):
    return [(bytes(c), i, t) for c, i, t in (j[k] for k in range(len(j)))]


def test_append_reload_and_sync(tmp_path):
    path = str(tmp_path / "j")
    j = DurableJournal(path)
    for i in range(1, 6):
        j.add(b"cmd%d" % i, i, 1)
    assert j.dirty
    j.sync()
    assert not j.dirty and j.syncs == 1
    j.sync()
    assert j.syncs == 1, "sync is a no-op when nothing changed"
    j.setCurrentTerm(3, "127.0.0.1:1")
    j._destroy()
    j2 = DurableJournal(path)
    assert entries(j2) == [(b"cmd%d" % i, i, 1) for i in range(1, 6)]
    assert j2.getCurrentTerm() == 3 and j2.getVotedForNodeId() == "127.0.0.1:1"
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


def test_matching_entries_are_kept_after_advisory_delete(tmp_path):
    """pysyncobj calls deleteEntriesFrom(prevLogIdx+1) on every AppendEntries; entries
    that match (same index and term) must survive, including those after the new ones."""
    j = DurableJournal(str(tmp_path / "j"))
    for i in range(1, 11):
        j.add(b"c%d" % i, i, 1)
    j.deleteEntriesFrom(5)  # position 5 = index 6
    j.add(b"c6", 6, 1)
    j.add(b"c7", 7, 1)
    assert [e[1] for e in entries(j)] == list(range(1, 11))


def test_conflicting_term_truncates_from_the_conflict(tmp_path):
    path = str(tmp_path / "j")
    j = DurableJournal(path)
    for i in range(1, 9):
        j.add(b"old%d" % i, i, 1)
    j.deleteEntriesFrom(5)
    j.add(b"old6", 6, 1)  # matches
    j.add(b"new7", 7, 2)  # conflicts: 7 and 8 go
    assert [(e[1], e[2]) for e in entries(j)] == [(i, 1) for i in range(1, 7)] + [(7, 2)]
    j.sync()
    j._destroy()
    assert [(e[1], e[2]) for e in entries(DurableJournal(path))] == \
        [(i, 1) for i in range(1, 7)] + [(7, 2)], "old8, past the new end, is gone from the file"


def test_torn_tail_is_dropped_on_load(tmp_path):
    path = str(tmp_path / "j")
    j = DurableJournal(path)
    for i in range(1, 4):
        j.add(b"x" * 100, i, 1)
    j.sync()
    j._destroy()
    with open(path, "r+b") as f:
        f.truncate(j._end - 7)  # a crash in the middle of the last record
    j2 = DurableJournal(path)
    assert [e[1] for e in entries(j2)] == [1, 2]
    j2.add(b"y", 3, 2)
    j2.sync()
    j2._destroy()
    assert [(e[1], e[2]) for e in entries(DurableJournal(path))] == [(1, 1), (2, 1), (3, 2)]


def test_appends_fill_a_reserve_of_zeros_without_changing_the_file_size(tmp_path, caplog):
    """What makes a follower's fdatasync cheap: no size or block-map change to commit."""
    path = str(tmp_path / "j")
    j = DurableJournal(path)
    j.add(b"a" * 100, 1, 1)
    j.sync()
    size = os.path.getsize(path)
    assert size >= j._end + PREALLOCATE - 200
    for i in range(2, 200):
        j.add(b"a" * 100, i, 1)
        j.sync()
    assert os.path.getsize(path) == size
    j._destroy()
    with caplog.at_level(logging.WARNING, logger="raftmesh.journal"):
        assert [e[1] for e in entries(DurableJournal(path))] == list(range(1, 200))
    assert not caplog.records, "the reserve is not a torn write"


def test_the_reserve_grows_when_records_reach_its_end(tmp_path):
    path = str(tmp_path / "j")
    j = DurableJournal(path)
    big = b"b" * (PREALLOCATE // 3)
    for i in range(1, 8):
        j.add(big, i, 1)
        j.sync()
        assert os.path.getsize(path) > j._end
    j._destroy()
    assert entries(DurableJournal(path)) == [(big, i, 1) for i in range(1, 8)]


def test_a_torn_write_inside_the_reserve_is_dropped_on_load(tmp_path, caplog):
    path = str(tmp_path / "j")
    j = DurableJournal(path)
    for i in (1, 2):
        j.add(b"c%d" % i, i, 1)
    j.sync()
    end = j._end
    j._destroy()
    with open(path, "r+b") as f:
        f.seek(end + 1000)
        f.write(b"\x07" * 30)  # sectors of an unsynced batch, landed out of order
    with caplog.at_level(logging.WARNING, logger="raftmesh.journal"):
        j2 = DurableJournal(path)
    assert [e[1] for e in entries(j2)] == [1, 2]
    assert "torn write" in caplog.text and os.path.getsize(path) == end
    j2.add(b"c3", 3, 1)
    j2.sync()
    j2._destroy()
    assert [e[1] for e in entries(DurableJournal(path))] == [1, 2, 3]


def test_compaction_keeps_the_tail(tmp_path):
    path = str(tmp_path / "j")
    j = DurableJournal(path)
    for i in range(1, 101):
        j.add(b"e%d" % i, i, 1)
    j.deleteEntriesTo(98)
    assert [e[1] for e in entries(j)] == [99, 100]
    j.add(b"e101", 101, 1)
    j.sync()
    j._destroy()
    assert [e[1] for e in entries(DurableJournal(path))] == [99, 100, 101]


def test_clear(tmp_path):
    path = str(tmp_path / "j")
    j = DurableJournal(path)
    j.add(b"a", 1, 1)
    j.clear()
    assert len(j) == 0
    j.add(b"b", 5, 2)
    j._destroy()
    assert entries(DurableJournal(path)) == [(b"b", 5, 2)]


def test_records_are_written_once_per_batch_and_truncation_sees_unwritten_ones(tmp_path):
    path = str(tmp_path / "j")
    j = DurableJournal(path)
    for i in (1, 2, 3):
        j.add(b"c%d" % i, i, 1)
    size = os.path.getsize(path)
    j.flush()  # what the replica does without fsync (durability "none"): one write
    assert os.path.getsize(path) > size
    assert entries(DurableJournal(path)) == [(b"c%d" % i, i, 1) for i in (1, 2, 3)], \
        "flushed records survive a process crash"
    j.add(b"c4", 4, 1)
    j.add(b"c5", 5, 1)  # not written yet
    j.add(b"new4", 4, 2)  # conflicts with a record still in memory
    j.sync()
    expected = [(b"c1", 1, 1), (b"c2", 2, 1), (b"c3", 3, 1), (b"new4", 4, 2)]
    assert entries(j) == expected
    j._destroy()
    assert entries(DurableJournal(path)) == expected


def test_a_record_torn_inside_is_dropped_with_what_follows(tmp_path):
    """A crash may persist a batch's sectors in any order: a record whose length, index and
    term survived but whose command did not must not load (the leader's resend of the same
    index and term would then be skipped as already present)."""
    path = str(tmp_path / "j")
    j = DurableJournal(path)
    for i in range(1, 6):
        j.add(b"%d" % i * 200, i, 1)
    j.sync()
    offset = j._offsets[3]  # index 4
    j._destroy()
    with open(path, "r+b") as f:
        f.seek(offset + 40)
        f.write(b"\0" * 16)  # inside index 4's command
    j2 = DurableJournal(path)
    assert [e[1] for e in entries(j2)] == [1, 2, 3]
    j2.add(b"4" * 200, 4, 1)  # the leader sends it again: taken, not skipped
    j2.sync()
    j2._destroy()
    assert entries(DurableJournal(path))[-1] == (b"4" * 200, 4, 1)


def test_the_checksum_covers_index_and_term(tmp_path):
    path = str(tmp_path / "j")
    j = DurableJournal(path)
    j.add(b"a", 1, 1)
    j.add(b"b", 2, 1)
    j.sync()
    offset = j._offsets[1]
    j._destroy()
    with open(path, "r+b") as f:
        f.seek(offset + 4)
        f.write((7).to_bytes(8, "little"))  # index 2 -> 7
    assert entries(DurableJournal(path)) == [(b"a", 1, 1)]


def test_a_journal_without_checksums_is_read_and_rewritten(tmp_path):
    import struct
    path = str(tmp_path / "j")
    head, tail = struct.Struct("<IQQ"), struct.Struct("<I")
    records = [(b"old%d" % i, i, 2) for i in (1, 2, 3)]
    with open(path, "wb") as f:
        f.write(b"RMJOURNAL1\n" + b"".join(head.pack(len(c), i, t) + c + tail.pack(len(c))
                                           for c, i, t in records) + b"\x09\x00")  # torn tail
    j = DurableJournal(path)
    assert entries(j) == records
    j.add(b"new4", 4, 2)
    j.sync()
    j._destroy()
    with open(path, "rb") as f:
        assert f.read(11) == b"RMJOURNAL2\n"
    assert entries(DurableJournal(path)) == records + [(b"new4", 4, 2)]


@pytest.mark.parametrize("records, named", [
    ([(b"a", 1, 1), (b"b", 2, 1), (b"d", 4, 1)], "index 4, term 1 after index 2, term 1"),
    ([(b"a", 1, 2), (b"b", 2, 1)], "index 2, term 1 after index 1, term 2"),
], ids=["a gap", "a term going back"])
def test_a_log_that_does_not_follow_on_is_refused_at_load(tmp_path, records, named):
    """Records that pass their checksums but do not follow each other come from a bug or a
    file mixed up by hand, not a crash: refused, named, and left as they are."""
    path = tmp_path / "j"
    data = _MAGIC + b"".join(_encode(*r) for r in records)
    path.write_bytes(data)
    with pytest.raises(JournalError, match=named):
        DurableJournal(str(path))
    assert path.read_bytes() == data


def test_an_entry_that_does_not_follow_the_log_is_not_written(tmp_path):
    path = str(tmp_path / "j")
    j = DurableJournal(path)
    for i in range(1, 4):
        j.add(b"c%d" % i, i, 2)
    for idx, term in ((5, 2), (4, 1)):  # a gap; a term going back
        with pytest.raises(JournalError, match=f"entry {idx} \\(term {term}\\) does not follow"):
            j.add(b"bad", idx, term)
    j.add(b"c4", 4, 2)
    j.sync()
    j._destroy()
    assert entries(DurableJournal(path)) == [(b"c%d" % i, i, 2) for i in range(1, 5)]
