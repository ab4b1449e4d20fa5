"""`raftmesh bench writes`: admin-API write latency and throughput, side by side with etcd.

Both systems run as many members (3 unless --replicas says otherwise) on this machine with
durable (fsynced) logs and are driven by the same aiohttp client loop over HTTP/JSON (etcd
through its v3 JSON gateway), so the ratio compares like with like on a shared machine.

Each row also reports CPU per acknowledged write, of the members (all server processes
together) and of the client: on a small machine the systems are CPU-bound, and CPU per
write says where the time goes even when other work shares the machine.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request
from typing import Callable

import aiohttp

from raftmesh.bench import harness, report
from raftmesh.bench.metrics import read_thread_cpu
from raftmesh.lab import processes
from raftmesh.lab.local_cluster import LocalCluster, free_ports

ONE_CLIENT = "1 client via leader"


def _measure(make_request, clients: int, seconds: float, progress: report.Progress,
             server_pids: list[int]) -> tuple[list[float], int, dict]:
    """_drive, plus CPU per acknowledged write of the servers and of this client process."""
    servers0, client0 = processes.cpu_seconds(server_pids), os.times()
    lat, errors = asyncio.run(_drive(make_request, clients, seconds, progress))
    servers1, client1 = processes.cpu_seconds(server_pids), os.times()
    n = max(1, len(lat))
    client = (client1.user - client0.user) + (client1.system - client0.system)
    return lat, errors, {"server_cpu_ms_per_write": (servers1 - servers0) / n * 1e3,
                         "client_cpu_ms_per_write": client / n * 1e3,
                         "server_cpu_cores": (servers1 - servers0) / seconds}


async def _drive(make_request, clients: int, seconds: float, progress: report.Progress):
    """Run `clients` closed-loop workers for `seconds`; returns (latencies, errors)."""
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker(w: int):
            nonlocal errors
            i = 0
            while time.monotonic() < deadline:
                i += 1
                started = time.perf_counter()
                try:
                    ok = await make_request(session, w, i)
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1
                progress.update(f"{_clients(clients)}: {len(latencies)} ok, {errors} errors")
        await asyncio.gather(*(worker(w) for w in range(clients)))
    return latencies, errors


def raftmesh_writer(cluster: LocalCluster, targets: list[str], tag: str):
    headers = {"Authorization": f"Bearer {cluster.admin_key}"}

    async def write(session, w, i):
        url = targets[(w + i) % len(targets)] + "/api/v1/users"
        async with session.post(url, json={"name": f"{tag}-{w}-{i}"}, headers=headers) as resp:
            await resp.read()
            return resp.status == 201
    return write


def etcd_writer(urls: list[str], tag: str):
    async def write(session, w, i):
        key = base64.b64encode(f"/bench/{tag}/{w}/{i}".encode()).decode()
        value = base64.b64encode(b'{"name":"x"}').decode()
        async with session.post(urls[(w + i) % len(urls)] + "/v3/kv/put",
                                json={"key": key, "value": value}) as resp:
            await resp.read()
            return resp.status == 200
    return write


class EtcdCluster:
    """etcd members on loopback, started from Debian's etcd-server when installed."""

    def __init__(self, workdir: str, members: int = 3):
        self.workdir, self.members, self.procs, self.client_urls = workdir, members, [], []

    @staticmethod
    def available() -> bool:
        return shutil.which("etcd") is not None

    def start(self) -> None:
        ports = free_ports(2 * self.members)
        names = [f"e{i}" for i in range(self.members)]
        peers = [f"http://127.0.0.1:{ports[2 * i + 1]}" for i in range(self.members)]
        initial = ",".join(f"{n}={p}" for n, p in zip(names, peers))
        for i, name in enumerate(names):
            client = f"http://127.0.0.1:{ports[2 * i]}"
            self.client_urls.append(client)
            log = open(os.path.join(self.workdir, f"{name}.log"), "wb")
            self.procs.append(subprocess.Popen(
                ["etcd", "--name", name, "--data-dir", os.path.join(self.workdir, name),
                 "--listen-client-urls", client, "--advertise-client-urls", client,
                 "--listen-peer-urls", peers[i], "--initial-advertise-peer-urls", peers[i],
                 "--initial-cluster", initial, "--initial-cluster-state", "new"],
                stdout=log, stderr=subprocess.STDOUT))
        self._wait_healthy()

    def _wait_healthy(self, timeout: float = 30) -> None:
        def healthy() -> bool:
            try:
                with urllib.request.urlopen(self.client_urls[0] + "/health", timeout=1) as r:
                    return b'"true"' in r.read()
            except OSError:
                return False
        processes.wait_until(healthy, timeout, what="etcd healthy", interval=0.1)

    def leader_url(self) -> str:
        """The client URL of the member that leads (the one-client shape writes there, as
        raftmesh's writes to its leader): the member whose id its own status names leader."""
        def leading() -> str | None:
            return next((url for url in self.client_urls
                         if (status := self.status(url)) and status.get("leader")
                         and status["leader"] == status["header"].get("member_id")), None)
        return processes.wait_until(leading, 30, what="an etcd member that reports itself leader",
                                   interval=0.1)

    @staticmethod
    def status(url: str) -> dict | None:
        """A member's `/v3/maintenance/status` (its id and its leader's), None if unreachable."""
        request = urllib.request.Request(url + "/v3/maintenance/status", data=b"{}",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=2) as r:
                return json.loads(r.read())
        except OSError:
            return None

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(timeout=10)


def run(out_dir: str, seconds: float = 10.0, concurrency: int = 64, with_etcd: bool = True,
        rounds: int = 1, replicas: int = 3) -> dict:
    """One client through the leader and `concurrency` clients over all replicas, against
    raftmesh and against etcd when installed, `rounds` times per system, alternating systems
    (and which goes first), both clusters up throughout: drift of a shared machine then falls
    on both, and each round gives a ratio of its own for each shape. One client through a
    follower runs once, before the rounds, and for raftmesh only: what forwarding adds."""
    rows, series, per_round = [], {}, []
    with harness.BenchRun("writes") as bench_run, bench_run.cluster(replicas) as cluster:
        etcd = EtcdCluster(bench_run.path, replicas) if with_etcd and EtcdCluster.available() else None
        try:
            if etcd is not None:
                etcd.start()
            leader = cluster.leader()
            followers = [r.api_url for r in cluster.replicas if r is not leader]
            everyone = [r.api_url for r in cluster.replicas]
            pids = [r.pid for r in cluster.replicas if r.pid]

            def shape(system, label, writer, clients, server_pids, tag):
                threads0 = read_thread_cpu(cluster) if system == "raftmesh" else {}
                lat, errors, cpu = _measure(writer(tag), clients, seconds, bench_run.progress,
                                            server_pids)
                n = max(1, len(lat))
                by_thread = {k: (v - threads0.get(k, 0.0)) / n * 1e6
                             for k, v in read_thread_cpu(cluster).items()} if threads0 else {}
                return {"system": system, "shape": label, "clients": clients, "lat": lat,
                        "errors": errors, "server_cpu_us_per_write_by_thread": by_thread, **cpu}

            ours = lambda tag, targets: raftmesh_writer(cluster, targets, tag)  # noqa: E731
            runs = []
            if followers:
                runs.append(shape("raftmesh", "1 client via follower", lambda t: ours(t, followers), 1,
                                  pids, "f"))
            systems = [("raftmesh", pids, "all replicas", lambda t: ours(t, [leader.api_url]),
                        lambda t: ours(t, everyone))]
            if etcd is not None:
                etcd_leader = etcd.leader_url()
                systems.append(("etcd", [p.pid for p in etcd.procs], "all members",
                                lambda t: etcd_writer([etcd_leader], t),
                                lambda t: etcd_writer(etcd.client_urls, t)))
            for i in range(rounds):
                got = {}
                for name, server_pids, everyone_label, one_writer, all_writer in \
                        (systems[::-1] if i % 2 else systems):
                    got[name] = (shape(name, ONE_CLIENT, one_writer, 1, server_pids, f"l{i}"),
                                 shape(name, f"{concurrency} clients, {everyone_label}", all_writer,
                                       concurrency, server_pids, f"c{i}"))
                    runs.extend(got[name])
                per_round.append(_round_summary(i + 1, got, seconds))
        finally:
            if etcd is not None:
                etcd.stop()
    for (system, label, clients), group in _grouped(runs).items():
        lat = [x for r in group for x in r["lat"]]
        rows.append({"system": system, "shape": label, "clients": clients, "rounds": len(group),
                     "writes_per_s": len(lat) / (seconds * len(group)),
                     "errors": sum(r["errors"] for r in group), **report.summarize(lat),
                     **{k: sum(r[k] for r in group) / len(group) for k in
                        ("server_cpu_ms_per_write", "client_cpu_ms_per_write", "server_cpu_cores")},
                     "server_cpu_us_per_write_by_thread": {
                         k: sum(r["server_cpu_us_per_write_by_thread"].get(k, 0.0) for r in group)
                         / len(group) for k in group[0]["server_cpu_us_per_write_by_thread"]}})
        series[f"{system}: {label}"] = lat
    result = {"benchmark": "writes", "seconds_per_shape": seconds, "rounds": rounds, "replicas": replicas,
              "machine": bench_run.machine(), "rows": rows, "per_round": per_round}
    # (per-round key, result key, clients, raftmesh/etcd over all rounds) for each shape
    comparisons = [("ratio", "throughput_ratio_vs_etcd", concurrency,
                    _pooled_ratio(rows, lambda r: r["clients"] == concurrency and r["shape"] != ONE_CLIENT)),
                   ("one_client_ratio", "one_client_ratio_vs_etcd", 1,
                    _pooled_ratio(rows, lambda r: r["shape"] == ONE_CLIENT))]
    result.update({name: ratio for _, name, _, ratio in comparisons if ratio})
    report.print_table(f"admin API writes, {replicas} replicas, durable journals", rows,
                       ["system", "shape", "rounds", "writes_per_s", "p50_ms", "p99_ms", "max_ms",
                        "errors", "server_cpu_ms_per_write", "client_cpu_ms_per_write"])
    for r in rows:
        split = {k: v for k, v in r["server_cpu_us_per_write_by_thread"].items() if v >= 0.5}
        if r["system"] == "raftmesh" and split:
            print(f"raftmesh, {r['shape']}: replica CPU per write by thread (µs, all replicas): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in sorted(split.items(), key=lambda kv: -kv[1])))
    if "throughput_ratio_vs_etcd" in result:
        print()
        for key, _, clients, ratio in comparisons:
            if not ratio:
                continue
            ratios = [r[key] for r in per_round if key in r]
            spread = (f" (rounds: {', '.join(f'{x:.2f}' for x in ratios)})" if len(ratios) > 1 else "")
            interval = report.mean_interval(ratios)
            if interval:
                result[f"{key}_of_rounds_mean_ci95"] = list(interval)
                spread += "; mean of rounds {:.2f}, 95% CI {:.2f}-{:.2f}".format(*interval)
            print(f"throughput ratio raftmesh/etcd, {_clients(clients)}: "
                  f"{ratio:.2f}{spread}")
    elif with_etcd:
        print("\netcd not installed (Debian etcd-server): no side-by-side ratio")
    report.save(out_dir, "writes", result, lambda: report.plot_cdfs(
        out_dir, "writes", f"admin API write latency ({replicas} replicas)", series))
    return result


def _clients(n: int) -> str:
    return f"{n} client" + ("s" if n > 1 else "")


def _round_summary(number: int, got: dict[str, tuple[dict, dict]], seconds: float) -> dict:
    """Writes per second of each system and shape in one round, and raftmesh/etcd ratios."""
    out: dict = {"round": number}
    for name, (one, concurrent) in got.items():
        out[f"{name}_one_client_writes_per_s"] = len(one["lat"]) / seconds
        out[f"{name}_writes_per_s"] = len(concurrent["lat"]) / seconds
    if out.get("etcd_writes_per_s"):
        out["ratio"] = out["raftmesh_writes_per_s"] / out["etcd_writes_per_s"]
    if out.get("etcd_one_client_writes_per_s"):
        out["one_client_ratio"] = out["raftmesh_one_client_writes_per_s"] / out["etcd_one_client_writes_per_s"]
    return out


def _pooled_ratio(rows: list[dict], of_shape: Callable[[dict], bool]) -> float | None:
    """raftmesh/etcd writes per second over all rounds of one shape."""
    rate = {r["system"]: r["writes_per_s"] for r in rows
            if of_shape(r) and "follower" not in r["shape"]}
    return rate["raftmesh"] / rate["etcd"] if rate.get("raftmesh") and rate.get("etcd") else None


def _grouped(runs: list[dict]) -> dict[tuple, list[dict]]:
    """Runs of the same system and shape together, in first-seen order."""
    out: dict[tuple, list[dict]] = {}
    for r in runs:
        out.setdefault((r["system"], r["shape"], r["clients"]), []).append(r)
    return out
