"""The replicas' own measurements, read from their /metrics: Prometheus histograms (the
propagation and revoke latencies the replicas record from acks) and CPU by thread role.
Benchmarks print them next to what they measured from the client side."""
from __future__ import annotations

import time
import urllib.error


def histogram_since(cluster, name: str, before: dict, expect: int = 0,
                    timeout: float = 10.0) -> dict:
    """Summary of what a histogram gained since `before`, once it holds `expect` new samples
    (acks are deferred by up to ACK_DELAY's upper bound) or at the deadline."""
    end = time.monotonic() + timeout
    while True:
        diff = histogram_diff(read_histogram(cluster, name), before)
        if diff["count"] >= expect or time.monotonic() > end:
            return histogram_summary(diff)
        time.sleep(0.1)  # polling /metrics against a deadline


def _metrics_texts(cluster) -> list[str]:
    """Every live replica's /metrics text (replicas that do not answer are left out)."""
    texts = []
    for r in cluster.replicas:
        if not r.alive():
            continue
        try:
            status, text = cluster.request(r, "GET", "/metrics", timeout=10)
        except (OSError, urllib.error.URLError):
            continue
        if status == 200 and isinstance(text, str):
            texts.append(text)
    return texts


def read_thread_cpu(cluster) -> dict[str, float]:
    """raftmesh_thread_cpu_seconds_total by thread role, summed over the live replicas."""
    out: dict[str, float] = {}
    prefix = 'raftmesh_thread_cpu_seconds_total{thread="'
    for text in _metrics_texts(cluster):
        for line in text.splitlines():
            if line.startswith(prefix):
                role = line[len(prefix):].split('"', 1)[0]
                out[role] = out.get(role, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def read_histogram(cluster, name: str) -> dict:
    """One Prometheus histogram from every live replica's /metrics: cumulative bucket
    counts summed over replicas, plus count and sum."""
    buckets: dict[float, float] = {}
    count = total = 0.0
    for text in _metrics_texts(cluster):
        for line in text.splitlines():
            if line.startswith(name + "_bucket{"):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                buckets[float(le)] = buckets.get(float(le), 0.0) + float(line.rsplit(" ", 1)[1])
            elif line.startswith(name + "_count "):
                count += float(line.rsplit(" ", 1)[1])
            elif line.startswith(name + "_sum "):
                total += float(line.rsplit(" ", 1)[1])
    return {"buckets": buckets, "count": count, "sum": total}


def histogram_diff(after: dict, before: dict) -> dict:
    """What was observed between two reads (replicas restarted in between are not handled:
    the caller reads before and after on the same processes)."""
    b = {le: after["buckets"][le] - before["buckets"].get(le, 0.0) for le in after["buckets"]}
    return {"buckets": b, "count": after["count"] - before["count"],
            "sum": after["sum"] - before["sum"]}


def histogram_summary(h: dict) -> dict:
    """count, mean and bucket-bound p50/p99 (the upper bound of the bucket holding the quantile)."""
    n = h["count"]
    out = {"count": int(n), "mean_ms": (h["sum"] / n * 1e3) if n else None}
    for q, key in ((0.5, "p50_le_ms"), (0.99, "p99_le_ms")):
        out[key] = None
        for le in sorted(h["buckets"]):
            if n and h["buckets"][le] >= q * n:
                out[key] = le * 1e3
                break
    return out
