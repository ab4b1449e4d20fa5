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
