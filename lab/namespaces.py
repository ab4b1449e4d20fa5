"""Network namespaces for the benchmarks that run real `raftmesh agent up` daemons with
wireguard-go (`bench connect`, `bench revoke --real`). Adapted from tests/netns.py (chaos
must not import tests/).

A `Lab` is a set of namespaces named `rmbl<pid>x<n>-<label>`, each with an `eth0` veth on a
bridge in the lab's own hub namespace; `connect_host()` adds a veth from the host into the hub
(masqueraded), so agents reach replicas listening on the host end. Processes started through
the lab are tracked and ended by pid; `close()` ends them, then anything still inside the
lab's namespaces (by pid), then deletes the namespaces by name (which removes the veths and
the bridge) and the host veth. `cleanup_stale()` removes labs whose creating process is gone.
WireGuard interface names are unique on the host (`ifname`): wireguard-go's control sockets
live in /var/run/wireguard, which all namespaces share.
"""
from __future__ import annotations

import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import ClassVar

from raftmesh.agent.wireguard import WG_RUN_DIR, remove_stale_socket

from .processes import proc_start_time, run, stop_pid, stop_proc

LAB_PREFIX = "rmbl"
BRIDGE_MAC = "02:72:6d:00:00:01"  # locally administered; one per lab hub, each its own L2
_counter = itertools.count()

# First ICMP echo reply from `dst`: probes every `interval` s, waits `wait` s for each reply,
# prints the wall-clock time the first reply arrived, exits 0 (1 after `timeout` s).
FIRST_REPLY_SCRIPT = r"""
import os, select, signal, socket, struct, sys, time
signal.signal(signal.SIGTERM, lambda *a: sys.exit(2))
dst, interval, wait, timeout = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ident, seq, end = os.getpid() & 0xffff, 0, time.monotonic() + timeout
print("ready", flush=True)
sent = 0
while time.monotonic() < end:
    seq = (seq + 1) & 0xffff
    hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"raftmesh"
    try:
        sock.sendto(struct.pack("!BBHHH", 8, 0, csum(hdr), ident, seq) + b"raftmesh", (dst, 0))
        sent += 1
    except OSError:
        pass
    deadline = time.monotonic() + (wait if sent else interval)
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        data, (src, _) = sock.recvfrom(2048)
        ihl = (data[0] & 0x0f) * 4
        t, _, _, rid, _ = struct.unpack("!BBHHH", data[ihl:ihl + 8])
        if t == 0 and rid == ident and src == dst:
            print("%.6f %d" % (time.time(), sent), flush=True)
            sys.exit(0)
sys.exit(1)
"""


def preflight() -> list[str]:
    """Why real-agent benchmarks cannot run here (empty if they can)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (network namespaces, WireGuard, nftables)")
    for tool in ("ip", "nft", "wg", "wireguard-go"):
        if run(["which", tool], check=False).returncode != 0:
            problems.append(f"{tool} is not installed")
    return problems


def netns_pids(ns: str) -> list[int]:
    return [int(p) for p in run(["ip", "netns", "pids", ns], check=False).stdout.split()]


def add_netns(name: str) -> None:
    """A namespace with its own resolver configuration: `ip netns exec` bind-mounts
    /etc/netns/<name>/resolv.conf over /etc/resolv.conf, so an agent inside that points the
    resolver at MagicDNS (agent/resolv_conf.py) changes the namespace's copy, never the
    host's file."""
    run(["ip", "netns", "add", name])
    os.makedirs(f"/etc/netns/{name}", exist_ok=True)
    try:
        with open("/etc/resolv.conf", "rb") as f:
            original = f.read()
    except FileNotFoundError:
        original = b""
    with open(f"/etc/netns/{name}/resolv.conf", "wb") as f:
        f.write(original)


def delete_netns(ns: str) -> None:
    for pid in netns_pids(ns):
        stop_pid(pid)
    run(["ip", "netns", "del", ns], check=False)
    shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)


def list_netns() -> list[str]:
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def cleanup_stale() -> None:
    for ns in list_netns():
        m = re.match(rf"^{LAB_PREFIX}(\d+)x", ns)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            delete_netns(ns)
    for line in run(["ip", "-o", "link", "show"], check=False).stdout.splitlines():
        m = re.match(rf"^\d+: ({LAB_PREFIX}(\d+)x\d+[hj])[@:]", line)
        if m and not os.path.exists(f"/proc/{m.group(2)}"):
            run(["ip", "link", "del", m.group(1)], check=False)
    if os.path.isdir(WG_RUN_DIR):  # sockets of labs' wireguard-go processes that were killed
        for name in os.listdir(WG_RUN_DIR):
            if name.startswith(("rm", "rb")) and name.endswith(".sock"):
                remove_stale_socket(os.path.join(WG_RUN_DIR, name))


@dataclass
class Namespace:
    lab: "Lab"
    label: str
    name: str
    underlay: str

    @property
    def ip(self) -> str:
        return self.underlay.split("/")[0]

    def argv(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, *args: str, input: str | None = None, timeout: float = 15,
            check: bool = True) -> subprocess.CompletedProcess:
        return run(self.argv(*args), input=input, timeout=timeout, check=check)

    def spawn(self, *args: str, **kw) -> subprocess.Popen:
        """Start a process in the namespace; the lab ends it by pid at close."""
        proc = subprocess.Popen(self.argv(*args), stdin=subprocess.DEVNULL, **kw)
        self.lab.track(proc)
        return proc

    def wg_peers(self, ifname: str) -> set[str] | None:
        """Public keys of the interface's WireGuard peers, read back with `wg show`."""
        p = self.run("wg", "show", ifname, "peers", check=False, timeout=10)
        return set(p.stdout.split()) if p.returncode == 0 else None

    def first_reply(self, dst: str, interval: float = 0.01, wait: float = 0.2,
                    timeout: float = 60.0) -> subprocess.Popen:
        """Start probing `dst`; returns once the prober runs (its 'ready' line)."""
        proc = self.spawn(sys.executable, "-c", FIRST_REPLY_SCRIPT, dst, str(interval), str(wait),
                          str(timeout), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"prober in {self.name} did not start")
        return proc


@dataclass
class Lab:
    """Namespaces on one bridge in the lab's own hub namespace, torn down by name; processes
    ended by pid. Subclasses (tests/netns.py) set their own name prefix and Namespace class."""

    prefix: ClassVar[str] = LAB_PREFIX
    ifname_prefix: ClassVar[str] = "rb"
    namespace_cls: ClassVar[type] = Namespace
    tag: str = ""
    namespaces: dict[str, Namespace] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    pids: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, start time)
    finalizers: list = field(default_factory=list)
    gateway: str | None = None
    ifnames: list[str] = field(default_factory=list)  # handed out; their sockets go at close

    def __post_init__(self) -> None:
        self.tag = self.tag or f"{self.prefix}{os.getpid()}x{next(_counter)}"
        self.hub = f"{self.tag}-hub"
        run(["ip", "netns", "add", self.hub])
        try:
            # A fixed address: a bridge otherwise takes the lowest MAC of its ports, so adding
            # or removing a namespace could change the gateway's MAC under the others' ARP
            # caches, and their new connections went nowhere for seconds (acks timed out).
            run(["ip", "-n", self.hub, "link", "add", "br0", "address", BRIDGE_MAC, "type", "bridge"])
            run(["ip", "-n", self.hub, "link", "set", "br0", "up"])
        except BaseException:
            delete_netns(self.hub)
            raise

    def track(self, proc: subprocess.Popen) -> None:
        self.procs.append(proc)

    def track_pid(self, pid: int | None) -> None:
        if pid:
            self.pids.append((pid, proc_start_time(pid)))

    def on_close(self, fn) -> None:
        """Run `fn` at close, before processes are ended (e.g. an interface's own close)."""
        self.finalizers.append(fn)

    def add(self, label: str, underlay: str) -> Namespace:
        name = f"{self.tag}-{label}"
        add_netns(name)
        ns = self.namespace_cls(self, label, name, underlay)
        self.namespaces[label] = ns
        port = f"v{label}"[:15]
        run(["ip", "-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0",
             "netns", name])
        run(["ip", "-n", self.hub, "link", "set", port, "master", "br0", "up"])
        run(["ip", "-n", name, "addr", "add", underlay, "dev", "eth0"])
        run(["ip", "-n", name, "link", "set", "eth0", "up"])
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        if self.gateway:
            run(["ip", "-n", name, "route", "add", "default", "via", self.gateway])
        return ns

    def remove(self, label: str) -> None:
        ns = self.namespaces.pop(label)
        delete_netns(ns.name)

    def connect_host(self, gateway: str = "192.0.2.254/24", routed: bool = False) -> str:
        """Let the lab's namespaces reach processes on the host (replicas, for agents).

        A veth pair joins the host and the hub namespace on a /30 of 203.0.113.0/24 picked
        per lab; the hub routes for the bridge (`gateway`) and masquerades towards the host,
        so the host needs no route to the lab's underlay (parallel labs can all use
        192.0.2.0/24). `routed`: the host routes the gateway's subnet into the lab instead
        and nothing from it is masqueraded, so servers on the host see the lab's own
        addresses (the NAT lab's public side, whose subnet is unique per lab: lab/nat.py).
        Returns the host-side address to bind servers to. Namespaces added afterwards get a
        default route via the gateway.
        """
        slot = (os.getpid() * 7 + next(_counter)) % 63
        host_ip, hub_ip = f"203.0.113.{4 * slot + 1}", f"203.0.113.{4 * slot + 2}"
        host_if = f"{self.tag}h"[-15:]
        run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", "up0", "netns", self.hub])
        self.on_close(lambda: run(["ip", "link", "del", host_if], check=False))
        run(["ip", "addr", "add", f"{host_ip}/30", "dev", host_if])
        run(["ip", "link", "set", host_if, "up"])
        subnet = str(ipaddress.ip_interface(gateway).network)
        if routed:
            run(["ip", "route", "add", subnet, "via", hub_ip, "dev", host_if])
        self._route_out(f"{hub_ip}/30", gateway, exempt=subnet if routed else None)
        return host_ip

    def join_bridge(self, bridge: str, address: str, gateway: str = "192.0.2.254/24") -> None:
        """Put the hub on a host bridge as `address` (a free address of the bridge's subnet):
        the lab's namespaces reach what sits on that bridge (a chaos run's replicas, each in
        its own namespace) through the hub's masquerade, and the host needs no forwarding."""
        host_if = f"{self.tag}j"[-15:]
        run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", "up0", "netns", self.hub])
        self.on_close(lambda: run(["ip", "link", "del", host_if], check=False))
        run(["ip", "link", "set", host_if, "master", bridge, "up"])
        self._route_out(address, gateway)

    def _route_out(self, uplink: str, gateway: str, exempt: str | None = None) -> None:
        """The hub's `up0` gets `uplink`, br0 `gateway`; the hub forwards and masquerades
        what leaves by up0 (except from `exempt`), and every namespace routes by default
        through the gateway."""
        run(["ip", "-n", self.hub, "addr", "add", uplink, "dev", "up0"])
        run(["ip", "-n", self.hub, "link", "set", "up0", "up"])
        run(["ip", "-n", self.hub, "addr", "add", gateway, "dev", "br0"])
        run(["ip", "netns", "exec", self.hub, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        unless = f"ip saddr != {exempt} " if exempt else ""
        run(["ip", "netns", "exec", self.hub, "nft", "-f", "-"], input=(
            "table ip lab_nat {\n chain post {\n  type nat hook postrouting priority 100;\n"
            f'  oifname "up0" {unless}masquerade\n }}\n}}\n'))
        self.gateway = gateway.split("/")[0]
        for ns in self.namespaces.values():
            run(["ip", "-n", ns.name, "route", "add", "default", "via", self.gateway])

    def ifname(self, label: str) -> str:
        """An interface name unique on the host (wireguard-go sockets are not per-namespace)."""
        name = f"{self.ifname_prefix}{label}{os.getpid() % 100000}{next(_counter)}"
        if len(name) > 15:
            raise ValueError(f"interface name {name!r} too long")
        self.ifnames.append(name)
        return name

    def close(self) -> None:
        errors: list[BaseException] = []
        for fn in reversed(self.finalizers):
            try:
                fn()
            except Exception as e:
                errors.append(e)
        self.finalizers.clear()
        for proc in self.procs:
            try:
                stop_proc(proc, timeout=10)
            except Exception as e:
                errors.append(e)
        self.procs.clear()
        for pid, start in self.pids:
            stop_pid(pid, start)
        self.pids.clear()
        for ns in [*(n.name for n in self.namespaces.values()), self.hub]:
            delete_netns(ns)
        self.namespaces.clear()
        for name in self.ifnames:  # a wireguard-go ended by SIGKILL leaves its socket behind
            remove_stale_socket(os.path.join(WG_RUN_DIR, f"{name}.sock"))
        self.ifnames.clear()
        if errors:
            raise errors[0]

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RealAgent:
    """One `raftmesh agent up` daemon in a namespace, with its own state dir and interface."""

    def __init__(self, lab: Lab, ns: Namespace, workdir: str, servers: list[str], auth_key: str,
                 label: str, extra_args: tuple[str, ...] = ()):
        self.ns, self.label, self.extra_args = ns, label, extra_args
        self.ifname = lab.ifname(label)
        self.state_dir = os.path.join(workdir, f"state-{label}-{self.ifname}")
        self.log_path = os.path.join(workdir, f"agent-{label}-{self.ifname}.log")
        self.servers, self.auth_key = servers, auth_key
        self.proc: subprocess.Popen | None = None
        self.started: float | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.started = time.time()
        self.proc = self.ns.spawn(sys.executable, "-m", "raftmesh.cli.main", "agent", "up",
                                  "--server", ",".join(self.servers), "--state-dir", self.state_dir,
                                  "--interface", self.ifname, "--hostname", f"host-{self.label}",
                                  "--endpoint", f"{self.ns.ip}:41641", *self.extra_args,
                                  stdout=log, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, RAFTMESH_AUTH_KEY=self.auth_key))
        log.close()

    def status(self) -> dict:
        try:
            with open(os.path.join(self.state_dir, "status.json")) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return {}

    def stop(self) -> None:
        if self.proc is not None:
            stop_proc(self.proc, timeout=10)

    def kill_hard(self) -> None:
        """SIGKILL the agent and its wireguard-go, by pid: the node dies without a goodbye
        and its tunnel with it (a crashed router), as failover tests and benchmarks need."""
        try:
            with open(os.path.join(self.state_dir, "wireguard-go.pid")) as f:
                wg_pid = json.load(f)["pid"]
        except (OSError, ValueError, KeyError):
            wg_pid = None
        self.proc.kill()
        if wg_pid:
            try:
                os.kill(wg_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)

    def log_tail(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-2000:]
        except FileNotFoundError:
            return ""


def rotated(servers: list[str], i: int) -> list[str]:
    """Agent i's server list: replica i mod n first (its home), then the others in order."""
    k = i % len(servers)
    return servers[k:] + servers[:k]
