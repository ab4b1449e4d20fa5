"""Operations: config files, metrics, readiness, continuous audit export."""
import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from conftest import wait_until
from raftmesh.cluster.config import ConfigError, ReplicaConfig
from raftmesh.lab.local_cluster import LocalCluster, free_ports
from raftmesh.storage.audit_chain import verify


def test_toml_config_unknown_keys_and_secret(tmp_path):
    cfg = tmp_path / "r.toml"
    cfg.write_text('id = "r1"\nraft_addr = "127.0.0.1:7000"\npeers = []\nclusterSecret = "x"\n')
    with pytest.raises(ConfigError, match="unknown settings"):
        ReplicaConfig.from_toml(str(cfg))
    cfg.write_text('id = "r1"\nraft_addr = "127.0.0.1:7000"\npeers = []\ndurability = "maybe"\n'
                   'cluster_secret = "0123456789abcdef"\n')
    with pytest.raises(ConfigError, match="durability"):
        ReplicaConfig.from_toml(str(cfg)).validate()


@pytest.mark.parametrize("flags, complaint", [
    (["--heartbeat", "0"], "heartbeat must be > 0"),
    (["--heartbeat", "0.2", "--election-min", "0.5"], "election_min > 3 x heartbeat"),
    (["--election-min", "1.0", "--election-max", "0.8"], "election_max > election_min"),
])
def test_server_refuses_raft_timing_that_cannot_work(tmp_path, flags, complaint):
    """The WAN settings (docs/geo.md) are flags too; a bad combination stops the start."""
    p = subprocess.run([sys.executable, "-m", "raftmesh.cli.main", "server", "--id", "r1",
                        "--raft-addr", "127.0.0.1:1", "--data-dir", str(tmp_path), *flags],
                       env=dict(os.environ, RAFTMESH_CLUSTER_SECRET="0123456789abcdef"),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and complaint in p.stderr
    assert not list(tmp_path.iterdir())


def test_server_runs_from_a_toml_file(tmp_path):
    raft, api = free_ports(2)
    cfg = tmp_path / "replica.toml"
    cfg.write_text(f'id = "solo"\nraft_addr = "127.0.0.1:{raft}"\npeers = []\napi_port = {api}\n'
                   f'data_dir = "{tmp_path / "data"}"\ncluster_secret = "0123456789abcdef"\n')
    os.chmod(cfg, 0o600)
    p = subprocess.Popen([sys.executable, "-m", "raftmesh.cli.main", "server", "--config", str(cfg)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import urllib.request
        def ready():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{api}/readyz", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False
        wait_until(ready, 30, what="replica from TOML config to be ready")
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=20)
    assert p.returncode == 0, "SIGTERM stops the replica cleanly"


def test_metrics_expose_raft_state_and_request_latency(shared_cluster):
    c = shared_cluster
    r = c.replicas[0]
    assert c.request(r, "POST", "/api/v1/users", {"name": "metrics-user"})[0] == 201
    assert c.request(r, "GET", "/api/v1/users/does-not-exist")[0] == 404
    status, text = c.request(r, "GET", "/metrics")
    assert status == 200
    for name in ("raftmesh_raft_term", "raftmesh_raft_commit_index", "raftmesh_raft_applied_index",
                 "raftmesh_raft_apply_lag", "raftmesh_raft_is_leader", "raftmesh_snapshots_total",
                 "raftmesh_journal_fsyncs_total"):
        assert f"\n{name} " in text, name
    assert 'raftmesh_api_request_seconds_count{method="POST",route="/api/v1/users",status="201"}' in text
    assert 'route="/api/v1/users/{name}",status="404"' in text
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                 "process_open_fds"):
        assert f"\n{name} " in text, name
    assert 'python_gc_collections_total{generation="0"}' in text
    assert 'raftmesh_gc_pause_seconds_count{generation="0"}' in text
    leaders = 0
    for rep in c.replicas:
        metrics = c.request(rep, "GET", "/metrics")[1]
        leaders += "\nraftmesh_raft_is_leader 1.0" in metrics
    assert leaders == 1


def test_healthz_and_readyz(shared_cluster):
    c = shared_cluster
    for r in c.replicas:
        assert c.request(r, "GET", "/healthz")[1]["status"] == "alive"
        status, body = c.request(r, "GET", "/readyz")
        assert status == 200 and body["ready"] is True


class _Sink(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Sink.received.extend(json.loads(line) for line in body.decode().splitlines())
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_audit_is_exported_continuously_to_a_file_and_http(tmp_path):
    port = free_ports(1)[0]
    sink = HTTPServer(("127.0.0.1", port), _Sink)
    thread = threading.Thread(target=sink.serve_forever, daemon=True)
    thread.start()
    export = tmp_path / "audit.jsonl"
    c = LocalCluster(str(tmp_path / "c"), replicas=3)
    c.replicas[0].extra_args = ["--audit-export-file", str(export),
                                "--audit-export-url", f"http://127.0.0.1:{port}/audit"]
    try:
        c.start_all()
        c.wait_ready()
        for i in range(5):
            assert c.request(c.replicas[i % 3], "POST", "/api/v1/users", {"name": f"a{i}"})[0] == 201
        status, body = c.request(c.replicas[1], "GET", "/api/v1/audit?limit=1000")
        live = body["entries"]

        def exported():
            if not export.exists():
                return False
            lines = [json.loads(l) for l in export.read_text().splitlines()]
            return len(lines) >= len(live) and lines
        lines = wait_until(exported, 15, what="audit entries in the export file")
        assert lines[: len(live)] == live
        assert verify(lines)[0]
        wait_until(lambda: len(_Sink.received) >= len(live), 15, what="audit entries at the HTTP sink")
        assert _Sink.received[: len(live)] == live
        assert oct(export.stat().st_mode & 0o777) == "0o600"
    finally:
        c.stop_all()
        sink.shutdown()


def test_data_files_are_private(shared_cluster):
    """Journal, meta, LMDB and snapshots hold keys (hashed) and the netmap signing key."""
    r = shared_cluster.replicas[0]
    assert shared_cluster.request(r, "POST", "/api/v1/cluster/snapshot")[0] == 202
    wait_until(lambda: os.path.exists(os.path.join(r.data_dir, "raft.snapshot")), 10,
               what="a snapshot file")
    assert os.stat(r.data_dir).st_mode & 0o077 == 0
    for root, _, files in os.walk(r.data_dir):
        for name in files:
            if name.endswith(".log"):
                continue
            mode = os.stat(os.path.join(root, name)).st_mode & 0o777
            assert mode & 0o077 == 0, f"{name} has mode {oct(mode)}"


def test_revoked_api_key_fails_on_every_replica_once_applied_there(shared_cluster):
    """Replicas cache API-key records (routing.ApiKeyCache); a delete must still take effect
    on each replica as soon as it has applied it, including where the record was cached."""
    c = shared_cluster
    status, body = c.request(c.replicas[0], "POST", "/api/v1/api-keys",
                             {"name": "revoke-me", "scopes": ["read"]})
    assert status == 201, body
    token, kid = body["key"], body["api_key"]["id"]
    for r in c.replicas:  # twice: the second request is served from the cache
        for _ in range(2):
            assert c.request(r, "GET", "/api/v1/users?stale=true", key=token)[0] == 200
    status, body = c.request(c.replicas[1], "DELETE", f"/api/v1/api-keys/{kid}")
    assert status == 200, body
    for r in c.replicas:
        wait_until(lambda r=r: c.request(r, "GET", "/api/v1/cluster/self")[1]["replica"]
                   ["applied_version"] >= body["version"], what=f"{r.id} applies the delete")
        status, err = c.request(r, "GET", "/api/v1/users?stale=true", key=token)
        assert (status, err["error"]["code"] if isinstance(err, dict) and "error" in err
                else err) == (401, "unauthenticated"), (r.id, status, err)


class _FakeReplica:
    """Just what ApiKeyCache uses: listeners and a store with read()."""

    def __init__(self, records):
        from contextlib import contextmanager
        self.records, self.reads, self.apply, self.reset, self.during_read = records, 0, [], [], None
        outer = self

        class Txn:
            def get(self, table, key):
                outer.reads += 1
                if outer.during_read:
                    outer.during_read()
                return outer.records.get(key)

        class Store:
            @contextmanager
            def read(self):
                yield Txn()
        self.store = Store()

    def add_apply_listener(self, fn):
        self.apply.append(fn)

    def add_reset_listener(self, fn):
        self.reset.append(fn)


def test_api_key_cache_is_invalidated_by_key_commands_and_snapshots():
    from raftmesh.api.routing import ApiKeyCache
    from raftmesh.cluster.commands import ApiKeyDelete, UserCreate
    rep = _FakeReplica({"k1": {"id": "k1", "scopes": ["admin"]}})
    cache = ApiKeyCache(rep)
    assert cache.get("k1")["id"] == "k1" and cache.get("k1") and rep.reads == 1
    assert cache.get("nope") is None and cache.get("nope") is None and rep.reads == 3  # misses not kept
    for fn in rep.apply:  # unrelated commands keep the cache
        fn([(5, UserCreate(name="a"), {"ok": True})])
    cache.get("k1")
    assert rep.reads == 3
    del rep.records["k1"]
    for fn in rep.apply:
        fn([(6, UserCreate(name="b"), {}), (7, ApiKeyDelete(id="k1"), {})])
    assert cache.get("k1") is None
    rep.records["k1"] = {"id": "k1", "scopes": ["read"]}
    assert cache.get("k1")["scopes"] == ["read"]
    rep.records["k1"] = {"id": "k1", "scopes": ["audit"]}
    for fn in rep.reset:  # a snapshot replaced the state
        fn()
    assert cache.get("k1")["scopes"] == ["audit"]


def test_api_key_cache_does_not_keep_a_record_read_before_a_concurrent_delete():
    from raftmesh.api.routing import ApiKeyCache
    from raftmesh.cluster.commands import ApiKeyDelete
    rep = _FakeReplica({"k1": {"id": "k1", "scopes": ["admin"]}})
    cache = ApiKeyCache(rep)
    # The delete is applied (and the cache cleared) while a lookup holds the old record.
    rep.during_read = lambda: [fn([(9, ApiKeyDelete(id="k1"), {})]) for fn in rep.apply]
    assert cache.get("k1") is not None  # what LMDB said at the time of the read
    rep.during_read, rep.records = None, {}
    assert cache.get("k1") is None  # not served from the cache afterwards


def test_only_apikey_commands_write_the_api_keys_table():
    """ApiKeyCache relies on it: it is emptied after batches with an API-key command. (A
    handler that reads api_keys and deletes from another table, as sign-in's pruning of
    console sessions does, writes nothing there.)"""
    import inspect
    import re
    from raftmesh.cluster import state_machine as sm
    for kind, fn in sm.HANDLERS.items():
        source = inspect.getsource(fn)
        helpers = [h for name, h in vars(sm).items() if callable(h) and f"{name}(" in source
                   and name.startswith("_")]
        writes = any(re.search(r'\.(put|delete)\(\s*"api_keys"', inspect.getsource(f))
                     for f in [fn] + helpers if inspect.isfunction(f))
        assert not writes or kind.changes_api_keys, kind.__name__
