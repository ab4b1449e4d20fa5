"""Local multi-process clusters: used by `raftmesh dev`, the tests, chaos runs and benchmarks.

Each replica is its own OS process (so it can be SIGKILLed, paused or restarted) started as
`python -m raftmesh.cli.main server ...`. Secrets go through the environment, never argv,
so they do not show in `ps`.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable

from raftmesh.api import auth
from raftmesh.storage.durable_files import write_file_durably


DESCRIPTION = "cluster.json"  # what `raftmesh dev` writes into its data directory


_issued_ports: set[int] = set()
_port_choice = random.SystemRandom().choice  # unaffected by anyone seeding `random`


def _ports_outside_ephemeral_range() -> range:
    """Where test and dev ports are drawn from. A port the kernel handed out by bind(0) lies
    in the ephemeral range, so between our probe and the replica's bind any outgoing
    connection (a peer dialling, a test's HTTP client, even a socket connecting to itself
    on a port nobody listens on yet) may take it as its source port, and the replica then
    exits with "address in use". Ports outside that range are never picked automatically."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    if low - 10000 >= 4096:
        return range(10000, low)
    if 65535 - high >= 4096:
        return range(high + 1, 65536)
    return range(0)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct TCP ports on `host` that are free now and were not returned before by this
    process (outside the ephemeral range where there is room for that)."""
    pool = _ports_outside_ephemeral_range()
    ports: list[int] = []
    for _ in range(200 * n):
        if len(ports) == n or not pool:
            break
        port = _port_choice(pool)
        if port not in _issued_ports and port not in ports and _bindable(host, port):
            ports.append(port)
    while len(ports) < n:  # no room outside the ephemeral range: let the kernel choose
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _issued_ports and port not in ports:
            ports.append(port)
    _issued_ports.update(ports)
    return ports


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class ReplicaProcess:
    id: str
    raft_addr: str
    api_url: str
    data_dir: str
    api_port: int
    proc: subprocess.Popen | None = None
    extra_args: list[str] = field(default_factory=list)
    host: str = ""  # address the API binds to; "" means the cluster's host

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class LocalCluster:
    def __init__(self, data_dir: str, replicas: int = 3, host: str = "127.0.0.1",
                 secret: str | None = None, admin_key: str | None = None,
                 extra_args: list[str] | None = None, log_dir: str | None = None,
                 hosts: list[str] | None = None, ports: tuple[int, int] | None = None,
                 command_prefix: Callable[[ReplicaProcess], list[str]] | None = None):
        """`hosts`, `ports` and `command_prefix` let each replica live in its own network
        namespace (chaos runs): replica n gets address hosts[n-1] with the fixed
        (raft, api) `ports` (every namespace has its own port space), and its command is
        prefixed with command_prefix(replica), e.g. ["ip", "netns", "exec", ns]."""
        self.data_dir = os.path.abspath(data_dir)
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        self.host = host
        self.secret = secret or auth.new_secret_token("cs")[1]
        self.admin_key = admin_key or auth.new_secret_token("rmk")[1]
        self.extra_args = extra_args or []
        self.log_dir = log_dir or self.data_dir
        self.hosts, self.ports, self.command_prefix = hosts, ports, command_prefix
        self.replicas: list[ReplicaProcess] = []
        for _ in range(replicas):
            self._new_replica()

    @classmethod
    def resume(cls, data_dir: str, **kw) -> "LocalCluster":
        """The cluster described by `<data_dir>/cluster.json` (write_description), with the
        same replica ids, addresses and admin key. Its replicas' Raft state names members by
        address and holds the admin key it bootstrapped, so a cluster started again on new
        ports never finds a quorum, and a new key would not be accepted."""
        with open(os.path.join(data_dir, DESCRIPTION)) as f:
            desc = json.load(f)
        cluster = cls(data_dir, replicas=0, admin_key=desc["admin_key"], **kw)
        for d in desc["replicas"]:
            host = d["raft_addr"].rsplit(":", 1)[0]
            cluster.replicas.append(ReplicaProcess(
                id=d["id"], raft_addr=d["raft_addr"], api_url=d["api_url"],
                data_dir=os.path.join(cluster.data_dir, d["id"]),
                api_port=int(d["api_url"].rsplit(":", 1)[1]), host=host))
        return cluster

    def _new_replica(self) -> ReplicaProcess:
        n = len(self.replicas) + 1
        host = self.hosts[n - 1] if self.hosts else self.host
        raft_port, api_port = self.ports or free_ports(2, self.host)
        r = ReplicaProcess(id=f"r{n}", raft_addr=f"{host}:{raft_port}",
                           api_url=f"http://{host}:{api_port}",
                           data_dir=os.path.join(self.data_dir, f"r{n}"), api_port=api_port,
                           host=host)
        self.replicas.append(r)
        return r

    # -- processes ------------------------------------------------------------------------
    def start(self, r: ReplicaProcess, join: bool = False, peers: list[str] | None = None) -> None:
        if peers is None:
            peers = [x.raft_addr for x in self.replicas if x is not r]
        args = [sys.executable, "-m", "raftmesh.cli.main", "server", "--id", r.id,
                "--raft-addr", r.raft_addr, "--peers", ",".join(peers),
                "--api-host", r.host or self.host, "--api-port", str(r.api_port), "--api-url", r.api_url,
                "--data-dir", r.data_dir, *self.extra_args, *r.extra_args]
        if join:
            args.append("--join")
        if self.command_prefix is not None:
            args = [*self.command_prefix(r), *args]
        env = dict(os.environ, RAFTMESH_CLUSTER_SECRET=self.secret,
                   RAFTMESH_BOOTSTRAP_ADMIN_KEY=self.admin_key)
        log = open(os.path.join(self.log_dir, f"{r.id}.log"), "ab")
        r.proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL)
        log.close()

    def start_all(self) -> None:
        for r in self.replicas:
            self.start(r)

    def add_replica(self) -> ReplicaProcess:
        """Start a new process that will join once the cluster adds it (see POST /cluster/members)."""
        r = self._new_replica()
        self.start(r, join=True)
        return r

    def kill(self, r: ReplicaProcess, sig: int = signal.SIGKILL) -> None:
        if r.alive():
            r.proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
                r.proc.wait(timeout=10)

    def stop_all(self) -> None:
        for r in self.replicas:
            if r.alive():
                r.proc.send_signal(signal.SIGCONT)
                r.proc.terminate()
        for r in self.replicas:
            if r.proc is not None:
                try:
                    r.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    r.proc.kill()
                    r.proc.wait(timeout=5)

    # -- HTTP helpers ----------------------------------------------------------------------
    def request(self, r: ReplicaProcess | str, method: str, path: str, body=None,
                key: str | None = None, timeout: float = 10.0, headers: dict | None = None):
        """(status, parsed JSON or text) without raising on HTTP errors."""
        base = r if isinstance(r, str) else r.api_url
        data = None
        hdrs = {"Authorization": f"Bearer {key or self.admin_key}", **(headers or {})}
        if body is not None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
        req = urllib.request.Request(base + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw, status = resp.read(), resp.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def wait_ready(self, replicas: list[ReplicaProcess] | None = None, timeout: float = 30.0) -> None:
        """Until every given replica answers /readyz 200 and the admin key works."""
        deadline = time.monotonic() + timeout
        pending = list(replicas or [r for r in self.replicas if r.alive()])
        last = None
        while pending:
            r = pending[0]
            try:
                status, body = self.request(r, "GET", "/readyz", timeout=1)
                last = f"/readyz {status} {body}"
                if status == 200 and self._started_up(r):
                    pending.pop(0)
                    continue
            except (OSError, urllib.error.URLError) as e:
                last = f"/readyz: {e!r}"
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica {r.id} not ready within {timeout}s; last {last}; "
                                   f"raft: {self._raft_status(r)} "
                                   f"(log: {os.path.join(self.log_dir, r.id + '.log')})")
            if not r.alive():
                raise RuntimeError(f"replica {r.id} exited with {r.proc.returncode}; "
                                   f"its log ends:\n{self.log_tail(r)}")
            time.sleep(0.05)

    def log_tail(self, r: ReplicaProcess, lines: int = 20) -> str:
        """The end of a replica's log, so a failure seen only in CI output can be diagnosed."""
        try:
            with open(os.path.join(self.log_dir, f"{r.id}.log"), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8192))
                return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")
        except OSError as e:
            return repr(e)

    def _raft_status(self, r: ReplicaProcess) -> str:
        """What a replica that is not ready says of its Raft state (for the error message)."""
        try:
            status, body = self.request(r, "GET", "/api/v1/cluster/self", timeout=2)
        except (OSError, urllib.error.URLError) as e:
            return repr(e)
        return str(body)[:600] if status == 200 else f"{status} {str(body)[:200]}"

    def _started_up(self, r: ReplicaProcess) -> bool:
        """The admin key works and the replica's start-up writes (its member record, the
        netmap signing key) are applied here, so tests start from a quiet state."""
        status, body = self.request(r, "GET", "/api/v1/cluster/members?stale=true", timeout=1)
        if status != 200 or r.id not in {m["id"] for m in body["members"]}:
            return False
        status, body = self.request(r, "GET", "/api/v1/cluster/keys?stale=true", timeout=1)
        return status == 200 and bool(body["keys"])

    def leader(self, timeout: float = 10.0) -> ReplicaProcess:
        deadline = time.monotonic() + timeout
        while True:
            for r in self.replicas:
                if not r.alive():
                    continue
                try:
                    status, body = self.request(r, "GET", "/api/v1/cluster/self", timeout=1)
                except (OSError, urllib.error.URLError):
                    continue
                if status == 200 and body["replica"]["state"] == "leader":
                    return r
            if time.monotonic() > deadline:
                raise TimeoutError("no leader")
            time.sleep(0.05)

    def describe(self) -> dict:
        return {"replicas": [{"id": r.id, "api_url": r.api_url, "raft_addr": r.raft_addr,
                              "pid": r.pid} for r in self.replicas],
                "admin_key": self.admin_key}

    def write_description(self, path: str) -> None:
        """Replaced whole (tmp file and rename): a script reading it while `dev` writes it
        found it empty or cut short (seen in test_dev_command_writes_cluster_json). Mode
        0600: it holds the admin key."""
        write_file_durably(path, json.dumps(self.describe(), indent=2).encode(), mode=0o600)
