"""`raftmesh bench policy`: validate and apply a policy of N rules (default 20,000, about
1 MB of HuJSON) on a local cluster, and how long each replica's /healthz takes meanwhile.

The issue it answers: such a policy used to hold a replica's event loop for 12 s while it
was validated (json5 on the loop, for any caller with a read key), and every replica's
netmap feed for 20-28 s while it was applied. Steps, with one /healthz prober thread per
replica sampling throughout (a request, then a 20 ms pause):
  1. baseline: the probers alone, 1 s;
  2. validate: POST /api/v1/policy/validate of the policy on r1;
  3. apply: PUT /api/v1/policy on the leader, then until every replica's netmaps are at that
     version (its `raftmesh_netmap_version` gauge), with `--nodes` registered light-agent
     nodes (no streams) whose netmaps the rules touch.
Reported per step and replica: the step's duration and /healthz p50/p99/max; the apply
step's CPU by thread (raftmesh_thread_cpu_seconds_total) and garbage-collector pauses
(raftmesh_gc_pause_seconds), all replicas; a PNG of every /healthz latency over time with
the steps marked.
"""
from __future__ import annotations

import json
import os
import threading
import time

from raftmesh.bench import harness, metrics, report

PROBE_PAUSE_S = 0.02


def policy_text(rules: int, users: list[str], hosts: int = 10) -> str:
    """A HuJSON policy of `rules` accept rules, ~50 bytes each (20,000 fit the 1 MiB limit):
    users and groups as sources, host prefixes over the first overlay addresses and tags as
    destinations, with comments and trailing commas."""
    groups = {f"group:g{i}": users[i::10] or users[:1] for i in range(10)}
    head = {"groups": groups, "tagOwners": {f"tag:t{i}": [f"group:g{i}"] for i in range(10)},
            "hosts": {f"h{i}": f"100.64.0.{i * 16}/28" for i in range(hosts)}}
    lines = []
    for i in range(rules):
        src = f"group:g{i % 10}" if i % 20 == 0 else users[i % len(users)]
        dst = f"tag:t{i % 10}:22" if i % 10 == 0 else f"h{i % hosts}:{i % 100}"
        lines.append('{"action":"accept","src":["%s"],"dst":["%s"]},' % (src, dst)
                     + ("\n" if i % 10 == 9 else ""))
    return ("// raftmesh bench policy\n{" + json.dumps(head)[1:-1] + ',\n"acls":[\n'
            + "".join(lines) + "],\n}\n")


class Prober:
    """GET /healthz on one replica in a loop: (start time, seconds, status) per request."""

    def __init__(self, cluster, replica):
        self.cluster, self.replica, self.samples = cluster, replica, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.time()
            try:
                status, _ = self.cluster.request(self.replica, "GET", "/healthz", timeout=60)
            except OSError:
                status = None
            self.samples.append((t, time.time() - t, status))
            self._stop.wait(PROBE_PAUSE_S)

    def __enter__(self) -> "Prober":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=70)


def gc_pauses(cluster) -> dict[str, float]:
    """{"<generation> count"|"<generation> seconds": total} of every replica's
    raftmesh_gc_pause_seconds histogram."""
    out: dict[str, float] = {}
    for r in cluster.replicas:
        status, text = cluster.request(r, "GET", "/metrics", timeout=60)
        for line in text.splitlines() if status == 200 and isinstance(text, str) else ():
            for suffix, what in (("_count", "count"), ("_sum", "seconds")):
                if line.startswith(f'raftmesh_gc_pause_seconds{suffix}{{generation="'):
                    key = f"{line.split(chr(34))[1]} {what}"
                    out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def gauge(cluster, replica, name: str) -> float:
    status, text = cluster.request(replica, "GET", "/metrics", timeout=60)
    if status == 200 and isinstance(text, str):
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return -1.0


def raft_term(cluster) -> float:
    return max(gauge(cluster, r, "raftmesh_raft_term") for r in cluster.replicas)


def run(out_dir: str, rules: int = 20000, nodes: int = 100, replicas: int = 3,
        timeout: float = 600.0) -> dict:
    steps, cpu, gc, elections = [], {}, {}, 0.0
    with harness.BenchRun("policy") as bench_run, \
            bench_run.cluster(replicas, keepalive=10.0) as cluster:
        progress = bench_run.progress
        keys = harness.setup_cluster(cluster)
        with bench_run.light_agents(cluster, 1) as agents:
            progress.update(f"registering {nodes} nodes", force=True)
            agents.register(nodes, keys[harness.BENCH_USER], prefix="la")
        text = policy_text(rules, [harness.BENCH_USER, harness.SVC_USER]
                           + [f"u{i}" for i in range(98)])
        size = len(text.encode())
        term0 = raft_term(cluster)
        probers = [Prober(cluster, r) for r in cluster.replicas]
        for p in probers:
            p.__enter__()
        try:
            def step(name: str, fn):
                progress.update(f"{name}: {rules} rules, {size} bytes", force=True)
                start = time.time()
                detail = fn()
                steps.append({"step": name, "start": start, "end": time.time(), **(detail or {})})

            step("baseline", lambda: time.sleep(1.0))
            step("validate", lambda: _expect(cluster.request(
                cluster.replicas[0], "POST", "/api/v1/policy/validate", text, timeout=timeout), 200))
            cpu0, gc0 = metrics.read_thread_cpu(cluster), gc_pauses(cluster)
            step("apply", lambda: _apply(cluster, text, timeout))
            cpu = {k: v - cpu0.get(k, 0.0) for k, v in metrics.read_thread_cpu(cluster).items()}
            gc = {k: v - gc0.get(k, 0.0) for k, v in gc_pauses(cluster).items()}
            elections = raft_term(cluster) - term0
        finally:
            for p in probers:
                p.__exit__()
        machine, pids = bench_run.machine(), bench_run.pids

    rows = []
    for s in steps:
        for p in probers:
            lat = [d for t, d, _ in p.samples if s["start"] <= t < s["end"]]
            rows.append({"step": s["step"], "replica": p.replica.id,
                         "step_s": s["end"] - s["start"], "healthz": len(lat),
                         **{f"healthz_{k}": v for k, v in report.summarize(lat).items()
                            if k in ("p50_ms", "p99_ms", "max_ms")}})
    failed = sum(1 for p in probers for _, _, st in p.samples if st != 200)
    result = {"benchmark": "policy", "machine": machine, "steps": steps, "rows": rows,
              "healthz_failed": failed, "pids": pids, "apply_cpu_s_by_thread": cpu,
              "apply_gc_pauses": gc, "raft_term_changes": elections,
              "config": {"rules": rules, "bytes": size, "nodes": nodes, "replicas": replicas},
              "samples": {p.replica.id: p.samples for p in probers}}
    report.print_table(f"policy of {rules} rules ({size} bytes), {nodes} nodes: step durations "
                       "and /healthz latency meanwhile", rows,
                       ["step", "replica", "step_s", "healthz", "healthz_p50_ms",
                        "healthz_p99_ms", "healthz_max_ms"])
    applied = next(s for s in steps if s["step"] == "apply")
    print(f"PUT answered after {applied['put_s']:.2f} s; every replica's netmaps at its version "
          f"after {applied['end'] - applied['start']:.2f} s; /healthz failures: {failed}; Raft "
          f"term changes (elections) during the steps: {elections:.0f}")
    print("CPU seconds of the apply step, all replicas, by thread: " + ", ".join(
        f"{k} {v:.2f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]) if v >= 0.01))
    print("garbage collections in the apply step, all replicas, by generation: " + ", ".join(
        f"gen {g}: {gc.get(f'{g} count', 0):.0f} taking {gc.get(f'{g} seconds', 0):.2f} s"
        for g in range(3)))
    report.save(out_dir, "policy", result, lambda: plot(out_dir, result))
    return result


def _expect(answer: tuple, status: int) -> None:
    if answer[0] != status:
        raise RuntimeError(f"expected {status}, got {answer[0]}: {str(answer[1])[:500]}")


def _apply(cluster, text: str, timeout: float) -> dict:
    """PUT through the leader; then until every replica's netmaps reached its version."""
    t = time.time()
    answer = cluster.request(cluster.leader(), "PUT", "/api/v1/policy", text, timeout=timeout)
    _expect(answer, 200)
    put_s, version = time.time() - t, answer[1]["version"]
    deadline = time.monotonic() + timeout
    applied = {}
    while len(applied) < len(cluster.replicas):
        for r in cluster.replicas:
            if r.id not in applied and gauge(cluster, r, "raftmesh_netmap_version") >= version:
                applied[r.id] = time.time() - t
        if time.monotonic() > deadline:
            raise RuntimeError(f"netmaps not at version {version} after {timeout}s: {applied}")
        time.sleep(0.05)  # polling the replicas' gauges, not synchronising
    return {"put_s": put_s, "version": version, "netmaps_at_version_s": applied}


def plot(out_dir: str, result: dict) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    t0 = result["steps"][0]["start"]
    fig, ax = plt.subplots(figsize=(9, 5))
    for rid, samples in result["samples"].items():
        ax.plot([t - t0 for t, _, _ in samples], [d * 1e3 for _, d, _ in samples], ".-",
                lw=0.6, ms=2, label=f"{rid} /healthz")
    for i, s in enumerate(result["steps"]):
        ax.axvspan(s["start"] - t0, s["end"] - t0, alpha=0.08,
                   color={"baseline": "grey", "validate": "orange", "apply": "blue"}[s["step"]])
        ax.text(s["start"] - t0, 0.98 - 0.04 * i, s["step"], fontsize=8, va="top",
                transform=ax.get_xaxis_transform())
    cfg = result["config"]
    ax.set_yscale("log")
    ax.set_xlabel("seconds since the start")
    ax.set_ylabel("/healthz latency (ms)")
    ax.set_title(f"/healthz while a {cfg['rules']}-rule policy is validated and applied")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return report.save_figure(fig, out_dir, "policy")


def add_arguments(parser) -> None:
    parser.add_argument("--rules", type=int, default=20000, help="accept rules in the policy")
    parser.add_argument("--nodes", type=int, default=100,
                        help="registered nodes (light agents, no streams) the rules apply to")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds each step may take before the run fails")


def main(args) -> int:
    run(args.out, args.rules, args.nodes, args.replicas, args.timeout)
    return 0
