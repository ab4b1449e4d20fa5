"""`raftmesh bench stream-memory`: resident memory per connected agent stream on one replica
(issue #5 `scale`, memory half; the CPU half is bench/scale.py).

Target: <= 20 KiB per stream at 10,000 streams. 3 replicas (`--replicas`); N light agents
(lab/light_agents.py) are registered first (so node records, netmap index entries and
registration garbage are already in the baseline), then their streams are opened, all on
replica r1, in `--steps` equal steps. After each step the agents must hold their netmaps
and be quiet (presence writes done), then r1's VmRSS is read from /proc/<pid>/status and its
open streams from its `raftmesh_map_streams` gauge. Reported: (RSS at N - RSS before any
stream) / N, and the least-squares slope of RSS over streams across the steps (less
sensitive to one-off growth such as the first allocation of arenas).

Included, because an agent's stream brings it: the socket and aiohttp request/response
objects, the hub's Stream record, the per-stream coroutine, the signed-request nonce kept
for 30 s, and the presence bookkeeping. Python rarely returns freed memory to the OS, so
this is an upper bound of the live memory.
"""
from __future__ import annotations

import os
import time

from raftmesh.bench import harness, report
from raftmesh.lab.light_agents import default_workers

TARGET_KIB = 20.0


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def streams_open(cluster, replica) -> float | None:
    status, text = cluster.request(replica, "GET", "/metrics", timeout=10)
    if status != 200 or not isinstance(text, str):
        return None
    for line in text.splitlines():
        if line.startswith("raftmesh_map_streams "):
            return float(line.split()[1])
    return None


def run(out_dir: str, streams: int = 10000, steps: int = 4, workers: int | None = None,
        keepalive: float = 10.0, concurrency: int = 64, replicas: int = 3) -> dict:
    workers = workers or default_workers(streams)
    points = []
    with harness.BenchRun("stream-memory") as bench_run, \
            bench_run.cluster(replicas, keepalive) as cluster:
        progress = bench_run.progress
        target = cluster.replicas[0]
        keys = harness.setup_cluster(cluster)
        with bench_run.light_agents(cluster, workers) as agents:
            progress.update(f"registering {streams} agents", force=True)
            t = time.monotonic()
            agents.register(streams, keys[harness.BENCH_USER], prefix="la", concurrency=concurrency)
            register_s = time.monotonic() - t
            agents.settle(quiet=2.0)
            points.append({"streams": streams_open(cluster, target) or 0, "rss_kib": vm_rss_kib(target.pid),
                           "connect_s": 0.0})
            progress.update(f"registered in {register_s:.0f}s; {target.id} RSS "
                            f"{points[0]['rss_kib'] / 1024:.1f} MiB before any stream", force=True)
            done = 0
            for k in range(1, steps + 1):
                count = streams * k // steps - done
                t = time.monotonic()
                # the last step starts every agent left (per-worker shares are rounded)
                if not agents.connect(timeout=max(120.0, count / 20), home=0,
                                      count=count if k < steps else None):
                    raise RuntimeError(f"streams did not all open: {agents.status()}")
                connect_s = time.monotonic() - t
                done = streams if k == steps else done + count
                agents.settle(quiet=2.0)
                rss = vm_rss_kib(target.pid)
                open_ = streams_open(cluster, target)
                points.append({"streams": open_, "rss_kib": rss, "connect_s": connect_s})
                progress.update(f"step {k}/{steps}: {open_:.0f} streams on {target.id}, RSS "
                                f"{rss / 1024:.1f} MiB ({(rss - points[0]['rss_kib']) / max(1, done):.1f} "
                                f"KiB/stream so far)", force=True)
            status = agents.status()
            others = {r.id: vm_rss_kib(r.pid) for r in cluster.replicas if r is not target}

    base = points[0]["rss_kib"]
    n = points[-1]["streams"] or streams
    per_stream = (points[-1]["rss_kib"] - base) / n if n else None
    xs, ys = [p["streams"] for p in points], [p["rss_kib"] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else None
    rows = [{"streams": int(p["streams"]), "rss_mib": p["rss_kib"] / 1024,
             "delta_mib": (p["rss_kib"] - base) / 1024,
             "kib_per_stream": (p["rss_kib"] - base) / p["streams"] if p["streams"] else None,
             "connect_s": p["connect_s"]} for p in points]
    result = {"benchmark": "stream-memory", "machine": bench_run.machine(), "points": points,
              "replica": target.id, "register_s": register_s, "per_stream_kib": per_stream,
              "slope_kib_per_stream": slope, "other_replicas_rss_kib": others, "pids": bench_run.pids,
              "final_status": status,
              "config": {"replicas": replicas, "streams": streams, "steps": steps, "workers": workers,
                         "stream_keepalive_s": keepalive},
              "target": {"what": f"<= {TARGET_KIB:g} KiB RSS per stream at 10,000 streams",
                         "at_streams": n, "met": per_stream is not None and per_stream <= TARGET_KIB}}
    report.print_table(f"stream memory: {target.id} VmRSS while streams open on it", rows,
                       ["streams", "rss_mib", "delta_mib", "kib_per_stream", "connect_s"])
    print(f"per stream at {n:.0f} streams: {per_stream:.2f} KiB (slope over steps "
          f"{slope or float('nan'):.2f} KiB) -> target {TARGET_KIB:g} KiB "
          f"{'met' if result['target']['met'] else 'MISSED'}"
          + ("" if n >= 10000 else f" (measured at {n:.0f} streams, not 10,000)"))
    report.save(out_dir, "stream-memory", result, lambda: plot(out_dir, points, target.id))
    return result


def plot(out_dir: str, points: list[dict], replica: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot([p["streams"] for p in points], [p["rss_kib"] / 1024 for p in points], "o-",
            label=f"{replica} VmRSS")
    base = points[0]["rss_kib"] / 1024
    xmax = max(p["streams"] or 0 for p in points)
    ax.plot([0, xmax], [base, base + xmax * TARGET_KIB / 1024], "--", color="red", lw=0.8,
            label=f"target: {TARGET_KIB:g} KiB per stream")
    ax.set_xlabel("open map streams on the replica")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_title("replica memory vs open agent streams")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return report.save_figure(fig, out_dir, "stream-memory")


# -- CLI: `raftmesh bench stream-memory` (bench/cli.py) --------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--streams", "--agents", type=int, default=10000,
                        help="agent streams opened on one replica (one per light agent)")
    parser.add_argument("--steps", type=int, default=4, help="RSS is read after each of these steps")
    harness.add_agent_options(parser)


def main(args) -> int:
    run(args.out, args.streams, args.steps, args.workers or None, args.stream_keepalive,
        args.register_concurrency, args.replicas)
    return 0
