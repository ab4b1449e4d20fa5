"""Every benchmark runs at a tiny size, only to prove it works end to end."""
import json

from raftmesh.chaos import bench_writes


def test_writes_benchmark_tiny(tmp_path):
    result = bench_writes.run(str(tmp_path), seconds=0.5, concurrency=4, with_etcd=True)
    rows = result["rows"]
    assert {r["system"] for r in rows} >= {"raftmesh"}
    assert all(r["n"] > 0 for r in rows if r["system"] == "raftmesh")
    saved = json.loads((tmp_path / "writes.json").read_text())
    assert saved["machine"]["cpus"] >= 1
    assert (tmp_path / "writes.png").stat().st_size > 1000
