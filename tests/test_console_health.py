"""The console's Live health across the cluster (api/cluster_health.py): every replica's
figures in one answer, a replica that does not answer shown down, not an error."""
from __future__ import annotations

import http.client
import json
import socket
import time
from urllib.parse import urlsplit

from in_memory_api import ServedInMemory
from raftmesh.api.cluster_health import HISTOGRAMS, PEER_TIMEOUT, figures


def call(api, method: str, path: str, body=None) -> tuple[int, dict]:
    u = urlsplit(api.replicas[0].api_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request(method, path, None if body is None else json.dumps(body),
                 {"Authorization": f"Bearer {api.admin_key}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    conn.close()
    return resp.status, answer


def test_every_replica_is_listed_and_a_silent_one_is_down(tmp_path):
    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    try:
        with ServedInMemory(str(tmp_path)) as api:
            status, made = call(api, "POST", "/api/v1/cluster/members",
                                {"id": "ghost", "raft_addr": f"127.0.0.1:{port}",
                                 "api_url": f"http://127.0.0.1:{port}"})
            assert status == 201, made
            started = time.monotonic()
            status, answer = call(api, "GET", "/api/v1/cluster/health")
            assert status == 200, answer
            assert time.monotonic() - started < PEER_TIMEOUT + 2
            by_addr = {r["raft_addr"]: r for r in answer["replicas"]}
            here, ghost = by_addr[api.replicas[0].raft_addr], by_addr[f"127.0.0.1:{port}"]
            assert here["up"] is True and set(here["histograms"]) == set(HISTOGRAMS)
            assert here["streams"] == 0
            assert ghost["up"] is False and ghost["id"] == "ghost" and "unreachable" in ghost["error"]
    finally:
        silent.close()


def test_figures_sum_labelled_series_and_keep_bucket_order():
    text = "\n".join([
        "# TYPE raftmesh_revoke_seconds histogram",
        'raftmesh_revoke_seconds_bucket{kind="a",le="0.1"} 1.0',
        'raftmesh_revoke_seconds_bucket{kind="a",le="+Inf"} 2.0',
        'raftmesh_revoke_seconds_bucket{kind="b",le="0.1"} 3.0',
        'raftmesh_revoke_seconds_bucket{kind="b",le="+Inf"} 3.0',
        'raftmesh_revoke_seconds_count{kind="a"} 2.0',
        "# TYPE raftmesh_map_streams gauge",
        "raftmesh_map_streams 4.0", ""])
    got = figures(text)
    assert got["histograms"]["raftmesh_revoke_seconds"] == [["0.1", 4.0], ["+Inf", 5.0]]
    assert got["histograms"]["raftmesh_netmap_propagation_seconds"] == [] and got["streams"] == 4.0
