"""The Raft thread's stall watch (cluster/raft/stall_watch.py)."""
import threading

from raftmesh.cluster.raft.stall_watch import StallWatch


def test_a_stalled_tick_is_reported_once_with_the_stack_then_its_end():
    release = threading.Event()

    def stuck_in_a_tick():
        release.wait(10)
    t = threading.Thread(target=stuck_in_a_tick)
    t.start()
    last = {"tick": 100.0}
    watch = StallWatch("r1", t, lambda: last["tick"], lambda: False, limit=5)
    try:
        assert watch.check(104.0) is None
        message = watch.check(106.0)
        assert "6.0 s" in message and "stuck_in_a_tick" in message
        assert watch.check(107.0) is None, "once per stall"
        last["tick"] = 107.5
        assert watch.check(108.0) == "replica r1: raft thread ticks again"
        assert watch.check(109.0) is None
    finally:
        release.set()
        t.join(5)
