"""Garbage-collector pauses are timed per generation and the callback goes with the app."""
import gc

from prometheus_client import CollectorRegistry

from raftmesh.api import process_metrics


def test_collections_are_timed_by_generation_until_closed():
    registry = CollectorRegistry()
    pauses = process_metrics.register(registry)
    try:
        count = lambda g: registry.get_sample_value(  # noqa: E731
            "raftmesh_gc_pause_seconds_count", {"generation": str(g)})
        gc.collect(0)
        gc.collect()
        assert count(0) >= 1 and count(2) >= 1
        assert registry.get_sample_value("raftmesh_gc_pause_seconds_sum", {"generation": "2"}) > 0
        assert registry.get_sample_value("process_resident_memory_bytes") > 0
    finally:
        pauses.close()
    before = count(2)
    gc.collect()
    assert count(2) == before and pauses._callback not in gc.callbacks


def test_replicas_raise_the_young_generation_threshold_and_never_lower_it():
    import gc

    from raftmesh.api.gc_tuning import GC_GEN0_THRESHOLD, raise_young_gc_threshold
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, saved[1], saved[2])
        raise_young_gc_threshold()
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, saved[1], saved[2])
        gc.set_threshold(GC_GEN0_THRESHOLD * 2, saved[1], saved[2])
        raise_young_gc_threshold()
        assert gc.get_threshold()[0] == GC_GEN0_THRESHOLD * 2
    finally:
        gc.set_threshold(*saved)


def test_cpu_is_counted_by_thread_role():
    """A busy thread named as the replica names its Raft thread shows up as `raft`; the
    main thread (where the server runs its event loop) as `event-loop`."""
    import threading
    import time

    from waiting import wait_until
    registry = CollectorRegistry()
    pauses = process_metrics.register(registry)
    value = lambda role: registry.get_sample_value(  # noqa: E731
        "raftmesh_thread_cpu_seconds_total", {"thread": role})
    try:
        before = value("raft")
        stop = threading.Event()

        def spin():
            end = time.thread_time() + 0.3
            while time.thread_time() < end:
                pass
            stop.wait(10)  # alive while the registry is read

        t = threading.Thread(target=spin, name="raft-r9")
        t.start()
        wait_until(lambda: value("raft") - before >= 0.2, 10, what="the spinning raft-r9 thread's CPU")
        assert value("event-loop") > 0
        stop.set()
        t.join(10)
    finally:
        pauses.close()
