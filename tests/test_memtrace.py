"""RAFTMESH_TRACEMALLOC: a replica started with it dumps tracemalloc snapshots and object
counts on SIGUSR2 (api/memtrace.py), and `python -m raftmesh.api.memtrace diff` reads them."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import tracemalloc

from raftmesh.api import memtrace

from proto_agent import ProtoAgent
from waiting import wait_until


def test_frames_from_env():
    assert memtrace.frames_from_env(None) == 0
    assert memtrace.frames_from_env("") == 0
    assert memtrace.frames_from_env("0") == 0
    assert memtrace.frames_from_env("1") == memtrace.DEFAULT_FRAMES
    assert memtrace.frames_from_env("yes") == memtrace.DEFAULT_FRAMES
    assert memtrace.frames_from_env("6") == 6


def test_sigusr2_dumps_snapshot_and_counts(make_cluster, monkeypatch):
    monkeypatch.setenv(memtrace.ENV, "4")  # inherited by the replica processes started below
    c = make_cluster(1)
    r = c.replicas[0]
    d = memtrace.dump_dir(r.data_dir)
    assert os.path.dirname(d) == os.path.dirname(os.path.abspath(r.data_dir))  # next to it

    def dump(n: int) -> str:
        os.kill(r.pid, signal.SIGUSR2)
        path = os.path.join(d, f"{n:04d}.types.json")
        wait_until(lambda: os.path.exists(path), timeout=30, what=f"dump {n}")
        return os.path.join(d, f"{n:04d}.tracemalloc")

    first = dump(1)
    admin = lambda m, p, b=None: c.request(r, m, p, b)  # noqa: E731
    assert admin("POST", "/api/v1/users", {"name": "alice"})[0] == 201
    key = admin("POST", "/api/v1/preauth-keys", {"user": "alice", "reusable": True})[1]["key"]
    agent = ProtoAgent(c, key, "a", 0)
    try:
        agent.connect()
        agent.pump(lambda s: s.view.netmap is not None)
        second = dump(2)
    finally:
        agent.close()

    with open(second.replace(".tracemalloc", ".types.json")) as f:
        info = json.load(f)
    assert info["streams"] == 1 and info["pid"] == r.pid and info["vm_rss_kib"] > 0
    assert info["types"]["raftmesh.api.map_stream.Stream"][0] == 1
    assert isinstance(info["frozen_objects"], int)  # what the counts by type cannot see
    assert tracemalloc.Snapshot.load(second).traces  # a loadable snapshot with traces

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert memtrace.main(["diff", "--dir", d, "1", "2", "--top", "1000"]) == 0
    text = out.getvalue()
    assert text.startswith("per 1: traced growth"), text[:200]
    assert "raftmesh.api.map_stream.Stream" in text  # one more of them between the dumps
    assert "frozen objects (not in the types below): " in text
    assert memtrace.diff(first, second, per=1, top=3)["top"]
