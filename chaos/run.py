"""`raftmesh chaos run`: real replicas in network namespaces, a recorded workload, a seeded
fault schedule, then checks that fail loudly with their evidence.

Phases: build the network (lab/replica_net.py) -> start replicas (and latency proxies) ->
workload + faults for --duration -> heal everything -> settle (every replica ready and at
the same applied version) -> stop replicas -> read each replica's LMDB -> checks -> write
--out. Exit status 0 when every check passes, 1 when one fails, 2 when the run could not
be carried out (bad arguments, not root, the cluster never became ready).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
from collections import Counter
from typing import Callable

from raftmesh.lab import latency_proxy
from raftmesh.lab.local_cluster import LocalCluster

from . import availability, checkers, clock, history as hist, plot
from .checkers import Check
from .faults import Injector, clear_removed_data
from raftmesh.lab.namespaces import preflight as agents_preflight
from raftmesh.lab.power import PowerLossDisk, preflight as power_preflight
from raftmesh.lab.processes import run as run_cmd, stop_pid
from raftmesh.lab.replica_net import ReplicaNet, preflight
from .schedule import FAULT_HELP, FAULTS, OPTIONAL_FAULTS, make_schedule
from .agent_checks import AGENT_USER, ChaosAgents
from .tunnels import TUNNEL_USER, ChaosTunnels
from .workload import OWNERS, USER_POOL, Workload

RAFT_PORT, API_PORT, PROXY_PORT, CONTROL_PORT = 7100, 8100, 7101, 7102
DISKFULL_MB = 128  # each replica's data directory with diskfull faults: a run's state fits
# Further checks over the finished run: fn(run: dict) -> Check. The hook for agent checks
# (netmaps seen by node daemons during the run) once agents join chaos runs.
EXTRA_CHECKS: list[Callable[[dict], Check]] = []


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "faults:\n" + "\n".join(f"  {k:<11} {v}" for k, v in FAULT_HELP.items()) + (
        "\n\nThe same --seed, --duration, --faults and --replicas give the same schedule "
        "(--print-schedule shows it without running anything). Needs root, iproute2 and nftables.")
    parser.add_argument("--replicas", type=int, choices=(3, 5), default=3)
    parser.add_argument("--faults", default=None,
                        help=f"comma-separated subset of {','.join(FAULTS + OPTIONAL_FAULTS)} "
                        f"(default: {','.join(FAULTS)}, without clock when libfaketime is not installed)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of workload under faults")
    parser.add_argument("--seed", type=int, default=None, help="schedule and workload seed (default: random, printed)")
    parser.add_argument("--out", default="chaos-out", help="directory for history, timeline, checks, plot")
    parser.add_argument("--concurrency", type=int, default=3,
                        help="workload clients per replica (each sends its first attempts to its own replica)")
    parser.add_argument("--settle", type=float, default=45.0, help="max seconds to converge after healing")
    parser.add_argument("--keep-data", action="store_true", help="keep replica data even when every check passes")
    parser.add_argument("--print-schedule", action="store_true", help="print the schedule and exit")
    parser.add_argument("--durability", choices=("fsync", "none"), default="fsync",
                        help="the replicas' durability setting: 'none' with powercut must lose "
                        "acknowledged writes, and the checks must say so")
    parser.add_argument("--agents", type=int, default=0,
                        help="protocol-exact light agents streaming netmaps through the faults; "
                        "checked for convergence and version order (docs/chaos.md, 'Agents')")
    parser.add_argument("--tunnels", action="store_true",
                        help="two real agents (wireguard-go) ping each other through their tunnel "
                        "for the whole run; any lost ping fails it (docs/chaos.md, 'Live tunnels'); "
                        "needs wireguard-go and wg")


def default_faults() -> list[str]:
    """Every fault kind this machine can inject."""
    return [f for f in FAULTS if f != "clock" or clock.library() is not None]


def requested_faults(spec: str | None) -> list[str]:
    """--faults as given (comma-separated), or every kind this machine can inject."""
    if spec is None:
        return default_faults()
    return [f.strip() for f in spec.split(",") if f.strip()]


def main(args) -> int:
    faults = requested_faults(args.faults)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(3), "big")
    try:
        schedule = make_schedule(seed, args.duration, faults, args.replicas)
    except ValueError as e:
        print(f"raftmesh chaos run: {e}", file=sys.stderr)
        return 2
    if args.print_schedule:
        for ev in schedule:
            print(f"{ev.start:7.2f}s +{ev.duration:5.2f}s  {ev.describe()}")
        return 0
    if args.agents < 0:
        print("raftmesh chaos run: --agents must be >= 0", file=sys.stderr)
        return 2
    if {"powercut", "diskfull"} <= set(faults):
        print("raftmesh chaos run: powercut and diskfull each need the data directories on their "
              "own filesystem; run them separately", file=sys.stderr)
        return 2
    problems = (preflight() + (power_preflight() if "powercut" in faults else [])
                + (agents_preflight() if args.tunnels else []))
    if "clock" in faults and clock.library() is None:
        problems.append("the clock fault needs libfaketime (apt install faketime)")
    if problems:
        print("raftmesh chaos run: cannot run here: " + "; ".join(problems), file=sys.stderr)
        return 2
    return Run(args, seed, faults, schedule).execute()


class Run:
    def __init__(self, args, seed, faults, schedule):
        self.args, self.seed, self.faults, self.schedule = args, seed, faults, schedule
        self.out = os.path.abspath(args.out)
        self.net: ReplicaNet | None = None
        self.cluster: LocalCluster | None = None
        self.proxies: list[subprocess.Popen] = []
        self.disks: dict[str, PowerLossDisk] = {}  # replica id -> its power-loss disk (powercut)
        self.tmpfs: list[str] = []  # data directories mounted as small tmpfs (diskfull)
        self.passed = False
        self.agents: ChaosAgents | None = None
        self.tunnels: ChaosTunnels | None = None
        self.tunnel: dict = {}  # the tunnel's figures (chaos/tunnels.py), when --tunnels
        self.checks: list[Check] = []
        self.started = time.monotonic()
        self.load: dict = {}  # 1-minute load average around the workload: contention inflates gaps

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {msg}", flush=True)

    def execute(self) -> int:
        os.makedirs(self.out, exist_ok=True)
        previous = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_interrupt)  # so the finally below still cleans up
        try:
            self.log(f"chaos run: seed {self.seed}, {self.args.replicas} replicas, {self.args.duration:g}s, "
                     f"faults {','.join(self.faults)} -> {self.out}")
            _write_json(os.path.join(self.out, "schedule.json"), [ev.to_dict() for ev in self.schedule])
            self._start()
            return self._run_and_check()
        except (TimeoutError, RuntimeError) as e:
            print(f"raftmesh chaos run: aborted: {e}", file=sys.stderr)
            return 2
        finally:
            self._teardown()
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, previous)

    # -- start and stop ---------------------------------------------------------------------------
    def _start(self) -> None:
        n = self.args.replicas
        self.net = ReplicaNet(n)
        self.net.setup()
        self.log(f"network: bridge {self.net.bridge} {self.net.subnet}, namespaces {', '.join(self.net.namespaces)}")
        data = os.path.join(self.out, "cluster")
        shutil.rmtree(data, ignore_errors=True)  # a previous run's replicas would not know our keys
        self.cluster = LocalCluster(data, replicas=n, hosts=self.net.ips,
                                    ports=(RAFT_PORT, API_PORT), command_prefix=self._prefix,
                                    extra_args=["--durability", self.args.durability])
        if "latency" in self.faults:
            for i, ip in enumerate(self.net.ips):
                self._start_proxy(i, ip)
        if "powercut" in self.faults:  # after the proxies: their namespaces hold no copy of the mounts
            for r in self.cluster.replicas:
                self.disks[r.id] = PowerLossDisk(r.data_dir + ".disk", r.data_dir)
                self.disks[r.id].mount()
            self.log("power-loss filesystems mounted: " + ", ".join(d.mountpoint for d in self.disks.values()))
        if "diskfull" in self.faults:  # after the proxies, like the power-loss disks
            for r in self.cluster.replicas:
                os.makedirs(r.data_dir, mode=0o700, exist_ok=True)
                run_cmd(["mount", "-t", "tmpfs", "-o", f"size={DISKFULL_MB}m,mode=0700", "tmpfs", r.data_dir])
                self.tmpfs.append(r.data_dir)
            self.log(f"{DISKFULL_MB} MB tmpfs data directories mounted: " + ", ".join(self.tmpfs))
        self.cluster.start_all()
        self.cluster.wait_ready(timeout=60)
        self.log(f"{n} replicas ready: " + ", ".join(f"{r.id} {r.api_url} pid {r.pid}" for r in self.cluster.replicas))
        if self.args.agents:
            self.agents = ChaosAgents(self.cluster, self.args.agents, self.cluster.log_dir, self.log)
            self.agents.start()
        if self.args.tunnels:
            self.tunnels = ChaosTunnels(self.cluster, self.net, os.path.join(self.out, "tunnels"), self.log)
            self.tunnels.start()

    def _prefix(self, r) -> list[str]:
        """Replica r runs in its namespace, on a power-loss disk with its own boot id when
        there are power cuts, under libfaketime when there are clock faults."""
        disk = self.disks.get(r.id)
        clock_prefix = (clock.prefix(clock.control_file(self.cluster.log_dir, r.id))
                        if "clock" in self.faults else [])
        return self.net.prefix(int(r.id[1:]) - 1) + (disk.boot_prefix() if disk else []) + clock_prefix

    def _start_proxy(self, i: int, ip: str) -> None:
        log = open(os.path.join(self.cluster.log_dir, f"proxy-r{i + 1}.log"), "ab")
        proc = subprocess.Popen(self.net.prefix(i) + [
            sys.executable, "-m", "raftmesh.lab.latency_proxy", "--listen", f"{ip}:{PROXY_PORT}",
            "--target", f"{ip}:{RAFT_PORT}", "--control", f"{ip}:{CONTROL_PORT}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.proxies.append(proc)
        deadline = time.monotonic() + 15
        while True:
            try:
                if latency_proxy.send((ip, CONTROL_PORT), "ping", timeout=0.5) == "ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"latency proxy in {self.net.namespaces[i]} did not start")
            time.sleep(0.05)
        self.net.redirect(i, RAFT_PORT, PROXY_PORT)

    def _teardown(self) -> None:
        if self.tunnels is not None:
            self.tunnels.close()
        if self.agents is not None:
            self.agents.close()
        try:
            if self.cluster is not None:
                self.cluster.stop_all()
        finally:
            for disk in self.disks.values():
                disk.unmount()
                if self.passed:
                    shutil.rmtree(disk.root, ignore_errors=True)
                    shutil.rmtree(disk.mountpoint, ignore_errors=True)
            for mountpoint in self.tmpfs:  # a failed run's data goes with it (it is in RAM)
                run_cmd(["umount", mountpoint], check=False)
        for p in self.proxies:
            if p.poll() is None:
                stop_pid(p.pid)
        if self.net is not None:
            self.net.close()

    # -- the run --------------------------------------------------------------------------------
    def _run_and_check(self) -> int:
        t0 = time.monotonic()
        self.started_wall = time.time()  # the replicas' logs are in wall time; t is from here
        proxies = {i: (ip, CONTROL_PORT) for i, ip in enumerate(self.net.ips)} if self.proxies else {}
        injector = Injector(self.cluster, self.net, self.schedule, t0, proxies, log=self.log,
                            disks=self.disks)
        workload = Workload([r.api_url for r in self.cluster.replicas], self.cluster.admin_key, self.seed,
                            t0, self.args.concurrency)
        thread = threading.Thread(target=injector.run, name="chaos-faults", daemon=True)
        self.load["start"] = round(os.getloadavg()[0], 2)
        thread.start()
        try:
            asyncio.run(self._drive(workload, injector))
        finally:
            injector.stop.set()
            thread.join(60)
            injector.heal_all()
        run_seconds = time.monotonic() - t0
        tunnel_check = None
        if self.tunnels is not None:
            tunnel_check, self.tunnel = self.tunnels.check(t0)
            self.tunnels.close()
        self.load["end"] = round(os.getloadavg()[0], 2)
        self.log(f"workload done: {len(workload.history)} ops in {run_seconds:.1f}s; healed, settling")
        settle_check, members = self._settle()
        agent_checks = []
        if self.agents is not None:
            self.log("checking agents ...")
            agent_checks = self.agents.check(self.args.settle)
        self.cluster.stop_all()
        current = checkers.current_members({r.id: r.raft_addr for r in self.cluster.replicas}, members)
        digests, tables = checkers.final_states(
            {r.id: os.path.join(r.data_dir, "state") for r in self.cluster.replicas}, current, self.log)
        result = self._check(workload, injector, settle_check, members, current, digests, tables, run_seconds)
        self.checks += agent_checks + ([tunnel_check] if tunnel_check else [])
        self._write(workload, injector, result, run_seconds)
        ok = all(c.ok for c in self.checks)
        self.passed = ok and not self.args.keep_data
        if ok and not self.args.keep_data:
            for r in self.cluster.replicas:
                shutil.rmtree(r.data_dir, ignore_errors=True)
            clear_removed_data(self.cluster)
        return 0 if ok else 1

    async def _drive(self, workload: Workload, injector: Injector) -> None:
        task = asyncio.create_task(workload.run(self.args.duration))
        last, last_n = time.monotonic(), 0
        while not task.done():
            await asyncio.wait([task], timeout=2.0)
            now = time.monotonic()
            s = workload.stats
            n = sum(s.done.values())
            fault = injector.current.detail if injector.current else "no fault"
            if self.agents is not None:
                fault += " | " + self.agents.status()
            if self.tunnels is not None:
                fault += " | " + self.tunnels.status()
            self.log(f"ops {n} (ok {s.done['ok']}, fail {s.done['fail']}, unknown {s.done['unknown']}), "
                     f"{(n - last_n) / max(1e-9, now - last):.0f}/s | {fault}")
            last, last_n = now, n
        task.result()

    def _settle(self) -> tuple[Check, dict]:
        """Every replica ready and at the same applied version (bounded by --settle)."""
        deadline = time.monotonic() + self.args.settle
        ev = []
        try:
            self.cluster.wait_ready(timeout=self.args.settle)
        except (TimeoutError, RuntimeError) as e:
            ev.append(f"not ready: {e}")
        members, versions, stable = {}, {}, 0
        while time.monotonic() < deadline:
            versions, members = {}, {}
            for r in self.cluster.replicas:
                try:
                    status, body = self.cluster.request(r, "GET", "/api/v1/cluster/self", timeout=2)
                except (OSError, urllib.error.URLError):
                    continue
                if status == 200:
                    versions[r.id] = body["replica"]["applied_version"]
                    members[r.id] = body["replica"]["members"]
            same = len(versions) == len(self.cluster.replicas) and len(set(versions.values())) == 1
            stable = stable + 1 if same else 0
            if stable >= 3:
                break
            time.sleep(0.2)
        else:
            ev.append(f"applied versions did not converge within {self.args.settle:g}s: {versions}")
        self.log("settled: " + ", ".join(f"{k} v{v}" for k, v in sorted(versions.items())))
        summary = f"all replicas ready at version {next(iter(versions.values()), '?')}" if not ev else "did not settle"
        return Check("settled", not ev, summary, ev), members

    def _check(self, workload, injector, settle_check, members, current, digests, tables, run_seconds) -> dict:
        history = workload.history
        self.checks = [settle_check]
        if injector.errors:
            self.checks.append(Check("faults", False, "the fault injector failed", injector.errors))
        self.checks.append(checkers.check_converged(digests, members, current))
        final = {}
        if tables is None:
            self.checks.append(Check("state", False, "no current member's state could be read"))
        else:
            pool = [f"u{i}" for i in range(USER_POOL)]
            owners, setup_keys, ours = OWNERS, set(workload.setup_key_ids), tables
            if self.agents is not None:  # the agents' user, key and nodes are setup, not workload
                owners, setup_keys = owners + (AGENT_USER,), setup_keys | {self.agents.key_id}
                ours = dict(ours, nodes={k: n for k, n in ours["nodes"].items()
                                         if n["machine_key"] not in self.agents.machines})
            if self.tunnels is not None:  # so are the tunnel agents': every node their user registered
                owners, setup_keys = owners + (TUNNEL_USER,), setup_keys | {self.tunnels.key_id}
                ours = dict(ours, nodes={k: n for k, n in ours["nodes"].items()
                                         if n["registered_by"] != TUNNEL_USER})
            final = checkers.final_values(ours, history, pool, owners, setup_keys)
            attributed, extra = checkers.attribute(history, final, ours, pool, owners, setup_keys)
            self.log("checking linearizability ...")
            self.checks += [checkers.check_linearizable(history + extra + checkers.final_reads(final, history)),
                            checkers.check_acknowledged(history, final), attributed,
                            checkers.check_atomic(tables)]
        self.checks.append(checkers.check_responses(workload.anomalies))
        ids = [r.id for r in self.cluster.replicas]
        gaps = availability.fault_gaps([(t, ids[i]) for t, i in workload.acks],
                                       [e.to_dict() for e in injector.timeline], run_seconds)
        self.checks.append(availability.check_available(gaps))
        run = {"gaps": gaps, "history": history, "tables": tables, "final": final, "timeline": injector.timeline,
               "digests": digests}
        for fn in EXTRA_CHECKS:
            self.checks.append(fn(run))
        return run

    # -- report ------------------------------------------------------------------------------------
    def _write(self, workload, injector, run, run_seconds) -> None:
        out = self.out
        hist.save(workload.history, os.path.join(out, "history.jsonl"))
        with open(os.path.join(out, "faults.jsonl"), "w") as f:
            for e in injector.timeline:
                f.write(json.dumps(e.to_dict()) + "\n")
        with open(os.path.join(out, "attempts.jsonl"), "w") as f:
            for a in workload.attempts:
                f.write(json.dumps(a, default=str) + "\n")
        _write_json(os.path.join(out, "final-state.json"), run["final"])
        _write_json(os.path.join(out, "checks.json"), [c.to_dict() for c in self.checks])
        counts = Counter(op.status for op in workload.history)
        kinds = Counter(e.kind for e in injector.timeline)
        ok = all(c.ok for c in self.checks)
        summary = {"verdict": "PASS" if ok else "FAIL", "seed": self.seed, "replicas": self.args.replicas,
                   "durability": self.args.durability,
                   "duration": self.args.duration, "faults": self.faults, "run_seconds": round(run_seconds, 1),
                   "workload_started_at": datetime.datetime.fromtimestamp(self.started_wall).isoformat(sep=" "),
                   "ops": len(workload.history), "by_status": dict(counts),
                   "client_ops": workload.stats.started,
                   "ops_per_second": round(len(workload.history) / max(run_seconds, 1e-9), 1),
                   "attempts": workload.stats.attempts, "retries": workload.stats.retries,
                   "latency_ok": checkers.latency_stats(workload.history),
                   "faults_injected": len(injector.timeline), "faults_by_kind": dict(kinds),
                   "write_gaps": run["gaps"], "load": self.load, "tunnel": self.tunnel or None,
                   "digests": {k: list(v) if v else None for k, v in run["digests"].items()},
                   "checks": {c.name: c.ok for c in self.checks}}
        title = (f"raftmesh chaos {summary['verdict']}: seed {self.seed}, {self.args.replicas} replicas, "
                 f"{len(workload.history)} ops, {len(injector.timeline)} faults")
        png = plot.plot(os.path.join(out, "plot.png"), workload.history,
                        [e.to_dict() for e in injector.timeline], title, run["gaps"], self.tunnel)
        summary["files"] = {"history": "history.jsonl", "attempts": "attempts.jsonl", "faults": "faults.jsonl", "checks": "checks.json",
                            "final_state": "final-state.json", "schedule": "schedule.json",
                            "plot": "plot.png" if png else None, "logs": "cluster/*.log",
                            "tunnels": "tunnels/ (agent logs, tunnel-probes.json)" if self.tunnels else None}
        summary["out"] = out
        _write_json(os.path.join(out, "summary.json"), summary)
        text = render_summary(summary, self.checks, injector.timeline)
        with open(os.path.join(out, "summary.txt"), "w") as f:
            f.write(text + "\n")
        print("\n" + text, flush=True)


def render_summary(s: dict, checks: list[Check], timeline) -> str:
    lat = s["latency_ok"]
    lines = [f"raftmesh chaos: {s['verdict']}  (seed {s['seed']}, {s['replicas']} replicas, "
             f"{s['duration']:g}s, faults {','.join(s['faults'])}; load {s['load']}"
             + (f", durability {s['durability']})" if s["durability"] != "fsync" else ")"),
             f"  ops: {s['ops']} ({', '.join(f'{k} {v}' for k, v in sorted(s['by_status'].items()))}) "
             f"from {s['client_ops']} client operations (a list read records one op per key), "
             f"{s['ops_per_second']}/s, {s['retries']} retries"
             + (f"; ok latency p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms" if lat else ""),
             f"  faults injected: {s['faults_injected']} ("
             + ", ".join(f"{k} {v}" for k, v in sorted(s["faults_by_kind"].items())) + ")"]
    gaps = {g["index"]: g for g in s.get("write_gaps", [])}
    for e in timeline:
        end = f"{e.end:6.1f}" if e.end is not None else "   -  "
        g = gaps.get(e.index)
        avail = (f" [leader {e.leader}; write gap {g['during']['seconds']:.1f}s on the others, "
                 f"{g['after']['seconds']:.1f}s after]") if g else ""
        lines.append(f"    {e.start:6.1f}-{end}s  #{e.index} {e.detail}{avail}" + "".join(f"; {n}" for n in e.notes))
    t = s.get("tunnel")
    if t and t["sent"]:
        lines.append(f"  tunnel: {t['sent']} pings over {t['last'] - t['first']:.1f}s, {t['lost']} lost, "
                     f"longest gap {t['longest_gap_s']:.2f}s, max rtt {t['max_rtt_ms']} ms")
    lines += [c.render() for c in checks]
    lines.append(f"  written to {s.get('out', '--out')}: " + ", ".join(v for v in s["files"].values() if v))
    if s.get("workload_started_at"):
        lines.append(f"  t=0 is {s['workload_started_at']} in the replicas' logs (cluster/r*.log)")
    if s["verdict"] == "FAIL":
        lines.append("  how to read a failure: docs/chaos.md, 'Reading a failure'")
    return "\n".join(lines)


def _write_json(path: str, data) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="raftmesh chaos run")
    add_arguments(p)
    sys.exit(main(p.parse_args()))
