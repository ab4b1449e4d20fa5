"""The Raft thread's stall watch (cluster/raft/stall_watch.py)."""
import subprocess
import sys
import textwrap
import threading

import pytest

from raftmesh.chaos import clock
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


@pytest.mark.skipif(clock.library() is None, reason="needs Debian's faketime")
def test_the_watch_runs_in_a_replica_whose_clock_is_faked(tmp_path):
    """Chaos `clock` faults start replicas under libfaketime, where `time.sleep` raises
    EINVAL: the watch's thread died at start in every such replica (campaign run 72's log).
    Its pauses now wait on a condition variable."""
    control = clock.control_file(str(tmp_path), "r1")
    script = textwrap.dedent("""
        import logging, threading, time
        from raftmesh.cluster.raft.pause import pause
        from raftmesh.cluster.raft.stall_watch import StallWatch
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        started = time.monotonic()
        pause(0.05)
        assert time.monotonic() - started >= 0.05
        reported = threading.Event()
        class Seen(logging.Handler):
            def emit(self, record):
                reported.set()
        logging.getLogger("raftmesh.replica").addHandler(Seen())
        stuck = threading.Thread(target=threading.Event().wait, args=(10.0,), daemon=True)
        stuck.start()
        done = threading.Event()
        StallWatch("r1", stuck, lambda: started, done.is_set, limit=0.2).start()
        assert reported.wait(10), "no stall reported"
        done.set()
    """)
    faked = clock.prefix(control)
    clock.set_offset(control, -3600)  # an hour behind, as a clock fault sets it
    proc = subprocess.run([*faked, sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "raft thread has not finished a tick" in proc.stderr
