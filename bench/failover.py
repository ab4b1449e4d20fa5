"""`raftmesh bench failover`: how long writes stop when the leader is SIGKILLed.

Issue #5 target: writes resume <= 2 s after the leader is killed. 3 replicas (`--replicas`)
with durable (fsynced) journals run on this machine. Client workers write continuously (`POST
/api/v1/users`, unique names, paced to `--rate` writes/s in total) through every replica's
URL and move to the next URL on a connection error, a timeout or a 503, as a real client
would. Each round: wait until writes flow and all replicas are ready, SIGKILL the leader,
and measure

- resume: kill -> first acknowledged write that was *sent after the killed process was
  reaped* (a write sent earlier may have been committed by the old leader, so it would
  understate the outage). This is the number the target is about.
- election: kill -> a survivor reports `state: leader` with a higher term (polled from
  /api/v1/cluster/self every 20 ms), plus who won and how many terms it took.
- client gap: last acknowledged write before the kill -> first one after it.

then restart the killed replica, wait until it is ready (caught up), and repeat.
Resolution is about the clients' retry backoff (20 ms) plus one write's latency.

Each round keeps the steady state for at least STEADY_S, longer than pysyncobj's connection
timeout, before the kill: between two followers, which say nothing to each other until an
election, the link has then been quiet that long, as on any cluster that ran for a while
(a restarted replica's links are young; a vote request on an old quiet link used to be lost,
see cluster/raft/connection.py).

Agents holding a current netmap after *their* replica is killed is the other half of the
issue's `failover`: bench/stream_failover.py.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass, field

import aiohttp

from raftmesh.cluster.config import ReplicaConfig
from raftmesh.lab.local_cluster import LocalCluster

from raftmesh.bench import harness, report

TARGET_RESUME_S = 2.0  # issue #5
BACKOFF_S = 0.02  # a client's pause after a failed write before trying the next replica
POLL_S = 0.02  # how often survivors' Raft state is polled during a round
STEADY_S = 1.5  # seconds of steady state before each kill (module doc)


@dataclass
class _Round:
    number: int
    started: float = field(default_factory=time.monotonic)
    kill_at: float | None = None  # just before SIGKILL was sent
    dead_at: float | None = None  # the killed process was reaped
    last_ack_before: float | None = None
    first_ack_any: float | None = None  # first acknowledgement after the kill, of any write
    first_ack: float | None = None  # ... of a write sent after dead_at
    first_ack_url: str | None = None
    acks: int = 0
    errors: int = 0
    resumed: asyncio.Event = field(default_factory=asyncio.Event)


class _Load:
    """Closed-loop client workers, paced to `rate` writes/s in total (0: as fast as they can)."""

    def __init__(self, cluster: LocalCluster, clients: int, rate: float, request_timeout: float):
        self.cluster, self.clients, self.rate = cluster, clients, rate
        self.urls = [r.api_url for r in cluster.replicas]
        self.timeout = aiohttp.ClientTimeout(total=request_timeout)
        self.round: _Round | None = None
        self.total_acks = self.total_errors = 0
        self.stopping = False

    async def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.cluster.admin_key}"}
        async with aiohttp.ClientSession(timeout=self.timeout, headers=headers,
                                         connector=aiohttp.TCPConnector(limit=0)) as session:
            await asyncio.gather(*(self._worker(session, w) for w in range(self.clients)))

    async def _worker(self, session: aiohttp.ClientSession, w: int) -> None:
        target, i = w % len(self.urls), 0
        interval = self.clients / self.rate if self.rate > 0 else 0.0
        next_at = time.monotonic()
        while not self.stopping:
            i += 1
            sent = time.monotonic()
            try:
                async with session.post(self.urls[target] + "/api/v1/users",
                                        json={"name": f"f{w}-{i}"}) as resp:
                    await resp.read()
                    ok = resp.status == 201
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                ok = False
            done = time.monotonic()
            rnd = self.round
            if ok:
                self.total_acks += 1
                if rnd is not None:
                    self._ack(rnd, sent, done, self.urls[target])
                if interval:
                    next_at = max(next_at + interval, done - 1.0)
                    if next_at > done:
                        await asyncio.sleep(next_at - done)
            else:
                self.total_errors += 1
                if rnd is not None and rnd.kill_at is not None:
                    rnd.errors += 1
                target = (target + 1) % len(self.urls)  # fail over to the next replica
                await asyncio.sleep(BACKOFF_S)
                next_at = time.monotonic()

    @staticmethod
    def _ack(rnd: _Round, sent: float, done: float, url: str) -> None:
        rnd.acks += 1
        if rnd.kill_at is None or done < rnd.kill_at:
            rnd.last_ack_before = done
            return
        if rnd.first_ack_any is None:
            rnd.first_ack_any = done
        if rnd.dead_at is not None and sent >= rnd.dead_at and rnd.first_ack is None:
            rnd.first_ack, rnd.first_ack_url = done, url
            rnd.resumed.set()


async def _status(session: aiohttp.ClientSession, url: str) -> dict | None:
    try:
        async with session.get(url + "/api/v1/cluster/self") as resp:
            if resp.status == 200:
                return (await resp.json())["replica"]
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, KeyError):
        pass
    return None


async def _watch_election(cluster: LocalCluster, survivors, old_term: int, rnd: _Round,
                          timeout: float) -> dict:
    """Poll the survivors until one says it leads in a later term."""
    headers = {"Authorization": f"Bearer {cluster.admin_key}"}
    deadline = rnd.kill_at + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5), headers=headers) as s:
        while time.monotonic() < deadline:
            for r in survivors:
                st = await _status(s, r.api_url)
                if st and st["state"] == "leader" and st["term"] > old_term:
                    return {"election_s": time.monotonic() - rnd.kill_at, "new_leader": r.id,
                            "term_before": old_term, "term_after": st["term"]}
            await asyncio.sleep(POLL_S)
    return {"election_s": None, "new_leader": None, "term_before": old_term, "term_after": None}


async def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.02)


async def _rounds(cluster: LocalCluster, rounds: int, clients: int, rate: float,
                  resume_timeout: float, progress: report.Progress, pids: list[int]) -> list[dict]:
    loop = asyncio.get_running_loop()
    load = _Load(cluster, clients, rate, request_timeout=2.0)
    writers = asyncio.create_task(load.run())
    results = []
    try:
        for n in range(1, rounds + 1):
            # Steady state first: every replica ready (the restarted one caught up), writes flowing.
            await loop.run_in_executor(None, lambda: cluster.wait_ready(timeout=60))
            rnd = load.round = _Round(n)
            await _wait_for(lambda: rnd.acks >= 20 or writers.done(), 30, "writes to flow")
            if writers.done():
                writers.result()  # raise what stopped them
            await asyncio.sleep(max(0.0, rnd.started + STEADY_S - time.monotonic()))
            leader = await loop.run_in_executor(None, cluster.leader)
            status, body = await loop.run_in_executor(
                None, lambda: cluster.request(leader, "GET", "/api/v1/cluster/self", timeout=2))
            old_term = body["replica"]["term"] if status == 200 else 0
            survivors = [r for r in cluster.replicas if r is not leader]
            progress.update(f"round {n}/{rounds}: SIGKILL leader {leader.id} (term {old_term})",
                            force=True)

            rnd.kill_at = time.monotonic()
            leader.proc.send_signal(signal.SIGKILL)
            election = asyncio.create_task(_watch_election(cluster, survivors, old_term, rnd,
                                                           resume_timeout))
            await loop.run_in_executor(None, leader.proc.wait)
            rnd.dead_at = time.monotonic()
            try:
                await asyncio.wait_for(rnd.resumed.wait(), resume_timeout)
            except asyncio.TimeoutError:
                pass
            elected = await election
            row = {"round": n, "killed": leader.id, **elected,
                   "resume_s": rnd.first_ack - rnd.kill_at if rnd.first_ack else None,
                   "first_ack_any_s": rnd.first_ack_any - rnd.kill_at if rnd.first_ack_any else None,
                   "client_gap_s": (rnd.first_ack - rnd.last_ack_before)
                   if rnd.first_ack and rnd.last_ack_before else None,
                   "reaped_after_s": rnd.dead_at - rnd.kill_at,
                   "first_ack_via": next((r.id for r in cluster.replicas
                                          if r.api_url == rnd.first_ack_url), None),
                   "failed_writes": rnd.errors}
            load.round = None
            progress.update(f"round {n}/{rounds}: resume {_ms(row['resume_s'])}, election "
                            f"{_ms(row['election_s'])}, new leader {row['new_leader']}; "
                            f"restarting {leader.id}", force=True)
            started = time.monotonic()
            await loop.run_in_executor(None, cluster.start, leader)
            pids.append(leader.pid)
            await loop.run_in_executor(None, lambda: cluster.wait_ready([leader], timeout=60))
            row["restart_to_ready_s"] = time.monotonic() - started
            results.append(row)
    finally:
        load.stopping = True
        try:
            await asyncio.wait_for(writers, 10)
        except (asyncio.TimeoutError, Exception):  # the rounds' outcome matters more here
            writers.cancel()
    return results


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f} ms"


def run(out_dir: str, rounds: int = 10, clients: int = 4, rate: float = 100.0,
        resume_timeout: float = 30.0, replicas: int = 3) -> dict:
    with harness.BenchRun("failover") as bench_run:
        with bench_run.cluster(replicas) as cluster:
            rows = asyncio.run(_rounds(cluster, rounds, clients, rate, resume_timeout,
                                       bench_run.progress, bench_run.pids))
        failed = [r["round"] for r in rows if r["resume_s"] is None]
        if failed:
            bench_run.failure = f"rounds {failed}: writes did not resume within {resume_timeout:g}s"

    defaults = ReplicaConfig(id="x", raft_addr="x:1", peers=[])
    summary = []
    for key, label in (("resume_s", "kill -> first acknowledged write (sent after the kill)"),
                       ("election_s", "kill -> new leader seen"),
                       ("first_ack_any_s", "kill -> first acknowledgement of any write"),
                       ("client_gap_s", "last ack before -> first ack after"),
                       ("restart_to_ready_s", "restart of killed replica -> ready")):
        summary.append({"metric": label, "key": key,
                        **report.summarize([r[key] for r in rows if r.get(key) is not None])})
    resume = summary[0]
    result = {"benchmark": "failover", "machine": bench_run.machine(), "rounds": rows,
              "replica_pids": bench_run.pids,
              "summary": summary, "config": {
                  "replicas": replicas, "durability": defaults.durability, "clients": clients,
                  "rate_writes_per_s": rate, "heartbeat_s": defaults.heartbeat,
                  "election_timeout_s": [defaults.election_min, defaults.election_max],
                  "client_backoff_s": BACKOFF_S, "poll_s": POLL_S},
              "target": {"what": f"writes resume <= {TARGET_RESUME_S:g} s after the leader is killed",
                         "max_resume_s": resume["max_ms"] / 1e3 if resume["n"] else None,
                         "met": bool(resume["n"]) and not failed
                         and resume["max_ms"] <= TARGET_RESUME_S * 1e3,
                         "failed_rounds": failed}}
    report.print_table(f"failover: SIGKILL the leader, {len(rows)} rounds, {replicas} replicas, durable journals",
                       [{k: (v * 1e3 if k.endswith("_s") and v is not None else v) for k, v in r.items()}
                        for r in rows],
                       ["round", "killed", "new_leader", "term_before", "term_after", "election_s",
                        "resume_s", "client_gap_s", "failed_writes", "restart_to_ready_s"])
    print("(times in ms)")
    report.print_table("failover distribution over rounds", summary,
                       ["metric", "n", "p50_ms", "p99_ms", "max_ms", "mean_ms"])
    t = result["target"]
    print(f"target ({t['what']}): worst round {_ms(t['max_resume_s'])} -> "
          f"{'met' if t['met'] else 'MISSED'}")
    report.save(out_dir, "failover", result, lambda: plot(out_dir, rows))
    return result


def plot(out_dir: str, rows: list[dict]) -> str:
    """Left: election and resume time per round. Right: their distributions (CDF)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    xs = [r["round"] for r in rows]
    series = {"kill -> new leader seen": "election_s",
              "kill -> first acknowledged write": "resume_s",
              "client gap (last ack -> next ack)": "client_gap_s"}
    width = 0.8 / len(series)
    for j, (label, key) in enumerate(series.items()):
        a1.bar([x + (j - 1) * width for x in xs], [(r.get(key) or 0) * 1e3 for r in rows],
               width, label=label)
        s = sorted(r[key] * 1e3 for r in rows if r.get(key) is not None)
        if s:
            a2.step([s[0], *s], [0.0, *((i + 1) / len(s) for i in range(len(s)))], where="post",
                    label=f"{label} (n={len(s)})")
    for ax in (a1, a2):
        ax.grid(True, alpha=0.3)
    a1.axhline(TARGET_RESUME_S * 1e3, color="red", lw=0.8, ls="--", label="target")
    a1.set_xlabel("round")
    a1.set_ylabel("ms after SIGKILL")
    a1.set_title("leader SIGKILL, per round")
    a1.set_xticks(xs)
    a1.legend(fontsize=8)
    a2.axvline(TARGET_RESUME_S * 1e3, color="red", lw=0.8, ls="--")
    a2.set_xlabel("ms after SIGKILL")
    a2.set_ylabel("fraction of rounds")
    a2.set_title("distribution over rounds")
    a2.legend(fontsize=8)
    return report.save_figure(fig, out_dir, "failover")


# -- CLI: `raftmesh bench failover` (bench/cli.py) ------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--rounds", type=int, default=10, help="leader kills (default 10)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client workers")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="total writes/s the clients aim for when healthy (0: unpaced)")
    parser.add_argument("--resume-timeout", type=float, default=30.0,
                        help="give up on a round after this many seconds without a write")


def main(args) -> int:
    """0 when every round's writes resumed (whether or not within the target), else 1."""
    result = run(args.out, args.rounds, args.clients, args.rate, args.resume_timeout,
                 args.replicas)
    return 1 if result["target"]["failed_rounds"] else 0
