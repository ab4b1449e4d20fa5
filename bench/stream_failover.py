"""`raftmesh bench stream-failover`: SIGKILL the replica agents stream from, until they hold
a current netmap again (issue #5 `failover`, second half; the first half, writes resuming
after a leader kill, is bench/failover.py).

Target: <= 3 s. 3 replicas (`--replicas`; durable journals), N light agents
(lab/light_agents.py: the real protocol with the daemon's failover: on EOF/error move to the
next replica URL after a full-jitter backoff of up to 0.2 s doubling, resume with the held
version) spread over the replicas. Each round:

1. every replica ready, every agent streaming from its home replica and quiet;
2. SIGKILL replica (round mod their number): the leader or a follower, as it comes;
3. right after the process is reaped, a policy change that touches every agent is written
   through a survivor (retried until a leader takes it; a killed leader means an election
   first). Its version V is what "current" means: a change committed after the kill;
4. per agent of the killed replica: kill -> it applied a netmap at version >= V (and, on the
   side, kill -> its stream was open on a survivor). The agents of the survivors are
   measured the same way, as the baseline of the write + propagation alone;
5. restart the killed replica, wait until it is ready, move agents back home.
"""
from __future__ import annotations

import signal
import time

from raftmesh.bench import harness, report
from raftmesh.lab.light_agents import default_workers

TARGET_S = 3.0


def run(out_dir: str, agents_n: int = 300, rounds: int = 10, workers: int | None = None,
        keepalive: float = 10.0, timeout: float = 60.0, replicas: int = 3) -> dict:
    workers = workers or default_workers(agents_n)
    rows, killed_samples, other_samples, reconnect_samples = [], [], [], []
    port = 22
    with harness.BenchRun("stream-failover") as bench_run, \
            bench_run.cluster(replicas, keepalive) as cluster:
        progress = bench_run.progress
        keys = harness.setup_cluster(cluster)
        with bench_run.light_agents(cluster, workers) as agents:
            progress.update(f"registering {agents_n} agents", force=True)
            agents.register(agents_n, keys[harness.BENCH_USER], prefix="la")
            harness.connect_all(agents, agents_n)
            for n in range(1, rounds + 1):
                cluster.wait_ready(timeout=60)
                agents.rehome(timeout=60)
                agents.settle(quiet=1.0)
                victim = cluster.replicas[(n - 1) % len(cluster.replicas)]
                leader = cluster.leader()
                on_victim = {w["node_id"] for w in agents.where() if w["replica"] == victim.id}
                progress.update(f"round {n}/{rounds}: SIGKILL {victim.id} "
                                f"({'leader' if victim is leader else 'follower'}), "
                                f"{len(on_victim)} agents stream from it", force=True)
                kill_at = time.time()
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait(10)
                reaped = time.time()
                port = 2222 if port == 22 else 22
                change = harness.put_policy(cluster, port, deadline=timeout)
                res = agents.wait_version(change["version"], timeout, prefix="la")
                recon = {r["node_id"]: r for r in agents.reconnects(kill_at)}
                k = [r["applied"] - kill_at for r in res if r["node_id"] in on_victim and r["applied"]]
                o = [r["applied"] - kill_at for r in res if r["node_id"] not in on_victim and r["applied"]]
                rc = [recon[i]["connected"] - kill_at for i in on_victim if i in recon]
                missing = len(on_victim) - len(k)
                killed_samples += k
                other_samples += o
                reconnect_samples += rc
                row = {"round": n, "killed": victim.id, "was_leader": victim is leader,
                       "agents_on_killed": len(on_victim), "reaped_ms": (reaped - kill_at) * 1e3,
                       "write_ms": (change["acked"] - kill_at) * 1e3, "write_via": change["via"],
                       "current_p50_ms": report.percentile(sorted(k), 0.5) * 1e3 if k else None,
                       "current_max_ms": max(k) * 1e3 if k else None,
                       "reconnect_max_ms": max(rc) * 1e3 if rc else None,
                       "others_max_ms": max(o) * 1e3 if o else None, "missing": missing}
                rows.append(row)
                progress.update(f"round {n}/{rounds}: killed {victim.id}: write acked after "
                                f"{row['write_ms']:.0f} ms, all its agents current after "
                                f"{row['current_max_ms'] or float('nan'):.0f} ms; restarting", force=True)
                cluster.start(victim)
                bench_run.pids.append(victim.pid)
            cluster.wait_ready(timeout=60)
            status = agents.status()

    summary = [{"metric": label, **report.summarize(v)} for label, v in (
        ("kill -> agent of the killed replica holds the change", killed_samples),
        ("kill -> its stream open on a survivor", reconnect_samples),
        ("kill -> agent of a survivor holds the change (baseline)", other_samples),
        ("kill -> policy write acknowledged", [r["write_ms"] / 1e3 for r in rows]))]
    worst = max((r["current_max_ms"] or 0 for r in rows), default=None)
    failed = [r["round"] for r in rows if r["missing"] or r["current_max_ms"] is None]
    result = {"benchmark": "stream-failover", "machine": bench_run.machine(), "rounds": rows,
              "summary": summary, "pids": bench_run.pids, "final_status": status,
              "config": {"replicas": replicas, "agents": agents_n, "workers": workers,
                         "stream_keepalive_s": keepalive},
              "target": {"what": f"agents of a SIGKILLed replica current again <= {TARGET_S:g} s",
                         "worst_round_ms": worst, "failed_rounds": failed,
                         "met": not failed and worst is not None and worst <= TARGET_S * 1e3}}
    report.print_table(f"stream failover: SIGKILL the agents' replica ({agents_n} agents, ms after the kill)",
                       rows, ["round", "killed", "was_leader", "agents_on_killed", "write_ms",
                              "reconnect_max_ms", "current_p50_ms", "current_max_ms", "others_max_ms",
                              "missing"])
    report.print_table("stream failover distribution (all agents of all rounds)", summary,
                       ["metric", "n", "p50_ms", "p99_ms", "max_ms", "mean_ms"])
    t = result["target"]
    print(f"target ({t['what']}): worst round {worst or float('nan'):.0f} ms -> "
          f"{'met' if t['met'] else 'MISSED'}")
    report.save(out_dir, "stream-failover", result, lambda: report.plot_cdfs(
        out_dir, "stream-failover", "replica SIGKILL -> agents current again",
        {"agents of the killed replica": killed_samples, "their reconnect": reconnect_samples,
         "agents of survivors": other_samples}))
    return result


# -- CLI: `raftmesh bench stream-failover` (bench/cli.py) ------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--agents", type=int, default=300, help="light agents spread over the replicas")
    parser.add_argument("--rounds", type=int, default=10, help="replica kills")
    harness.add_agent_options(parser, register_concurrency=False)
    parser.add_argument("--timeout", type=float, default=60.0, help="per round")


def main(args) -> int:
    """0 when every round's agents got current again (whatever the time), else 1."""
    result = run(args.out, args.agents, args.rounds, args.workers or None, args.stream_keepalive,
                 args.timeout, args.replicas)
    return 1 if result["target"]["failed_rounds"] else 0
