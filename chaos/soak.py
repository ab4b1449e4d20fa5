"""`raftmesh chaos soak`: hours of moderate write load with agents streaming, watching for
slow leaks that a 60-second chaos run cannot show.

Three replicas, `--agents` protocol-exact light agents (lab/light_agents.py) registered and
streaming netmaps, spread over the replicas, and a paced write load through the admin API
(users created and deleted, and a policy change every POLICY_EVERY seconds, which sends a
netmap frame to every agent). Every `--sample` seconds each replica's resident memory and
open file descriptors are read from /proc and the write latencies of the interval are
summarised. After the warm-up (the first `--warmup` share of the run) the judgement is:
- memory flat: each replica's anonymous resident memory (RssAnon: the heap, where a leak
  shows) at the end is within MAX_RSS_GROWTH of its value at the end of the warm-up
  (medians of MEDIAN_OF samples, so a GC cycle is not a trend). VmRSS is recorded too,
  but it also counts the LMDB map's resident file pages, which grow with the data (every
  write appends an audit record), not with a leak;
- descriptors flat: no replica ends with more open fds than it had after the warm-up
  (plus FD_SLACK for connections in flight);
- no stream lost: every agent connected at every sample and none reconnected.
Writes `soak.json` and `soak.png` (RSS, fds and latency over time) to `--out`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from raftmesh.bench import harness
from raftmesh.bench.stream_memory import vm_rss_kib
from raftmesh.lab.light_agents import default_workers

MAX_RSS_GROWTH = 0.05
FD_SLACK = 5
MEDIAN_OF = 3
POLICY_EVERY = 30.0
SAVE_EVERY = 6  # samples


def rss_anon_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def judge(samples: list[dict], agents: int, warmup_s: float) -> list[dict]:
    """The soak's checks over its samples (pure: tested on hand-made samples)."""
    after = [s for s in samples if s["t"] >= warmup_s]
    if len(after) < 2 * MEDIAN_OF:
        return [{"name": "enough samples", "ok": False,
                 "summary": f"{len(after)} samples after the warm-up; need {2 * MEDIAN_OF} (run longer)"}]
    checks = []
    for rid in sorted(after[0]["anon_kib"]):
        start = statistics.median(s["anon_kib"][rid] for s in after[:MEDIAN_OF])
        end = statistics.median(s["anon_kib"][rid] for s in after[-MEDIAN_OF:])
        growth = (end - start) / start
        rss = f"; VmRSS {after[0]['rss_kib'][rid] / 1024:.1f} -> {after[-1]['rss_kib'][rid] / 1024:.1f} MiB"
        checks.append({"name": f"{rid} memory flat", "ok": growth <= MAX_RSS_GROWTH,
                       "summary": f"RssAnon {start / 1024:.1f} -> {end / 1024:.1f} MiB after the warm-up "
                                  f"({growth:+.1%}, limit {MAX_RSS_GROWTH:+.0%}){rss}"})
        fd_start, fd_end = after[0]["fds"][rid], after[-1]["fds"][rid]
        checks.append({"name": f"{rid} descriptors flat", "ok": fd_end <= fd_start + FD_SLACK,
                       "summary": f"open fds {fd_start} -> {fd_end} (slack {FD_SLACK})"})
    short = [s for s in samples if s["connected"] < agents]
    reconnects = samples[-1]["reconnects"]
    checks.append({"name": "no stream lost", "ok": not short and reconnects == 0,
                   "summary": f"{agents} agents connected at every sample, {reconnects} reconnects" if not short
                   else f"{len(short)} samples with fewer than {agents} connected (first at "
                        f"{short[0]['t']:.0f}s: {short[0]['connected']}), {reconnects} reconnects"})
    return checks


def run(out: str, minutes: float, agents: int = 1000, writes_per_second: float = 10.0,
        sample_every: float = 10.0, warmup: float = 0.2) -> dict:
    seconds = minutes * 60
    samples: list[dict] = []
    with harness.BenchRun("soak") as bench_run, bench_run.cluster(3) as cluster:
        progress = bench_run.progress
        keys = harness.setup_cluster(cluster)
        with bench_run.light_agents(cluster, default_workers(agents)) as swarm:
            progress.update(f"registering {agents} agents", force=True)
            swarm.register(agents, keys[harness.BENCH_USER], prefix="soak", concurrency=64)
            harness.connect_all(swarm, agents)
            swarm.settle(quiet=2.0)
            started, wall = time.monotonic(), time.time()
            latencies: list[float] = []
            n, next_sample, next_policy = 0, 0.0, POLICY_EVERY
            while (t := time.monotonic() - started) < seconds:
                latencies.append(_write(cluster, n))
                n += 1
                if t >= next_policy:
                    harness.put_policy(cluster, 22 + n % 2)  # every agent gets a frame
                    next_policy += POLICY_EVERY
                if t >= next_sample:
                    samples.append(_sample(cluster, swarm, t, latencies, wall))
                    latencies = []
                    if len(samples) % SAVE_EVERY == 0:  # a soak cut short still leaves its record
                        _save(out, minutes, agents, writes_per_second, seconds * warmup, n, samples, bench_run)
                    next_sample += sample_every
                    s = samples[-1]
                    progress.update(f"{t / 60:.1f}/{minutes:g} min: {n} writes, {s['connected']}/{agents} "
                                    f"streams, RSS {' '.join(f'{k} {v / 1024:.0f}M' for k, v in s['rss_kib'].items())}, "
                                    f"p99 {s['p99_ms']} ms", force=True)
                pause = started + n / writes_per_second - time.monotonic()
                if pause > 0:
                    time.sleep(pause)  # pacing the load, not waiting for a condition
            samples.append(_sample(cluster, swarm, time.monotonic() - started, latencies, wall))
    return _save(out, minutes, agents, writes_per_second, seconds * warmup, n, samples, bench_run)


def _save(out, minutes, agents, writes_per_second, warmup_s, writes, samples, bench_run) -> dict:
    checks = judge(samples, agents, warmup_s)
    result = {"verdict": "PASS" if all(c["ok"] for c in checks) else "FAIL", "minutes": minutes,
              "ran_seconds": round(samples[-1]["t"], 1), "agents": agents, "writes": writes,
              "writes_per_second": writes_per_second, "warmup_seconds": warmup_s,
              "machine": bench_run.machine(), "checks": checks, "samples": samples}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "soak.json"), "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    plot(os.path.join(out, "soak.png"), result)
    return result


def _write(cluster, n: int) -> float:
    """One user create or delete through a replica in turn; its latency in ms (None if refused)."""
    r = cluster.replicas[n % len(cluster.replicas)]
    name = f"soak{n // 2 % 50}"
    t = time.monotonic()
    try:
        if n % 2 == 0:
            status, _ = cluster.request(r, "POST", "/api/v1/users", {"name": name}, timeout=10)
        else:
            status, _ = cluster.request(r, "DELETE", f"/api/v1/users/{name}", timeout=10)
    except OSError:
        return None
    return (time.monotonic() - t) * 1000 if status in (200, 201, 404, 409) else None


def _sample(cluster, swarm, t: float, latencies: list, wall: float) -> dict:
    status = swarm.status()
    ok = sorted(x for x in latencies if x is not None)
    return {"t": round(t, 1), "rss_kib": {r.id: vm_rss_kib(r.pid) for r in cluster.replicas},
            "anon_kib": {r.id: rss_anon_kib(r.pid) for r in cluster.replicas},
            "fds": {r.id: open_fds(r.pid) for r in cluster.replicas},
            "connected": status["connected"], "reconnects": len(swarm.reconnects(wall)),
            "writes": len(latencies), "failed_writes": len(latencies) - len(ok),
            "p50_ms": round(ok[len(ok) // 2], 1) if ok else None,
            "p99_ms": round(ok[min(len(ok) - 1, int(len(ok) * 0.99))], 1) if ok else None}


def plot(path: str, result: dict) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    samples = result["samples"]
    ts = [s["t"] / 60 for s in samples]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    for rid in sorted(samples[0]["rss_kib"]):
        ax1.plot(ts, [s["rss_kib"][rid] / 1024 for s in samples], label=f"{rid} VmRSS")
        ax1.plot(ts, [s["anon_kib"][rid] / 1024 for s in samples], linestyle=":", label=f"{rid} RssAnon")
        ax2.plot(ts, [s["fds"][rid] for s in samples], label=rid)
    ax1.set_ylabel("resident (MiB)")
    ax2.set_ylabel("open fds")
    ax3.plot(ts, [s["p50_ms"] for s in samples], label="p50")
    ax3.plot(ts, [s["p99_ms"] for s in samples], label="p99")
    ax3.set_ylabel("write latency (ms)")
    ax3.set_xlabel("minutes")
    for ax in (ax1, ax2, ax3):
        ax.axvline(result["warmup_seconds"] / 60, color="grey", linestyle="--", linewidth=0.8)
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"raftmesh soak {result['verdict']}: {result['agents']} agents streaming, "
                 f"{result['writes_per_second']:g} writes/s, {result['ran_seconds'] / 60:.1f} min "
                 "(dashed: end of warm-up)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--agents", type=int, default=1000, help="light agents streaming netmaps")
    parser.add_argument("--writes-per-second", type=float, default=10.0)
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=0.2, help="share of the run before judging")
    parser.add_argument("--out", default="chaos-soak")


def main(args) -> int:
    if args.minutes <= 0 or args.agents < 1 or args.writes_per_second <= 0 or not 0 <= args.warmup < 1:
        print("raftmesh chaos soak: need --minutes > 0, --agents >= 1, --writes-per-second > 0, "
              "0 <= --warmup < 1", file=sys.stderr)
        return 2
    result = run(args.out, args.minutes, args.agents, args.writes_per_second, args.sample, args.warmup)
    for c in result["checks"]:
        print(f"[{'PASS' if c['ok'] else 'FAIL'}] {c['name']}: {c['summary']}")
    print(f"raftmesh soak: {result['verdict']} after {result['ran_seconds'] / 60:.1f} min -> {args.out}")
    return 0 if result["verdict"] == "PASS" else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="raftmesh chaos soak")
    add_arguments(p)
    sys.exit(main(p.parse_args()))
