"""A small network-namespace lab for data-plane and end-to-end tests.

A `Lab` is a set of namespaces named `rmlab<pid>x<n>-<label>`, each with an `eth0` veth
plugged into a bridge that lives in the lab's own hub namespace, so nothing is created in
the host's namespace (the host may use the same documentation prefixes). Processes started
through the lab are tracked by pid; `close()` ends them by pid, then ends any process still
left inside the lab's namespaces (also by pid) and deletes the namespaces by name, which
takes the veths and the bridge with them. `cleanup_stale()` does the same for labs whose
creating process is gone (a run killed before its finalizers).

The helpers that run *inside* a namespace (ICMP echo, TCP client/server) are tiny Python
scripts run with `ip netns exec`: no ping or nc is needed, and every wait is bounded.
"""
from __future__ import annotations

import itertools
import os
import re
import select
import subprocess
import sys
from dataclasses import dataclass, field

LAB_PREFIX = "rmlab"
_counter = itertools.count()

# -- scripts run inside namespaces ----------------------------------------------------------

PING_SCRIPT = r"""
import os, select, signal, socket, struct, sys, time
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
dst, timeout, count, interval = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ident = os.getpid() & 0xffff
def probe(seq):
    hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"raftmesh"
    pkt = struct.pack("!BBHHH", 8, 0, csum(hdr), ident, seq) + b"raftmesh"
    try:
        sock.sendto(pkt, (dst, 0))
    except OSError:
        return False
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        data, (src, _) = sock.recvfrom(2048)
        ihl = (data[0] & 0x0f) * 4
        t, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
        if t == 0 and rid == ident and rseq == seq and src == dst:
            return True
    return False
ok_all = True
for seq in (range(1, count + 1) if count else iter(int, 1)):
    start = time.monotonic()
    ok = probe(seq & 0xffff)
    ok_all = ok_all and ok
    sys.stdout.write("." if ok else "x"); sys.stdout.flush()
    time.sleep(max(0.0, interval - (time.monotonic() - start)))
sys.exit(0 if ok_all else 1)
"""

TCP_CLIENT_SCRIPT = r"""
import errno, socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(b"hello\n")
        print("ok" if s.recv(64) == b"hello\n" else "bad-echo")
except socket.timeout:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print("error:" + errno.errorcode.get(e.errno, str(e.errno)))
"""

TCP_SERVER_SCRIPT = r"""
import signal, socket, sys, threading
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(64)
print("listening", flush=True)
def echo(c):
    with c:
        while data := c.recv(4096):
            c.sendall(data)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"""


# -- helpers ----------------------------------------------------------------------------------

from waiting import wait_until as wait_for  # noqa: E402,F401  (one polling helper for all tests)

# Process and namespace primitives are shared with the benchmarks' lab.
from raftmesh.chaos.benchlab import (  # noqa: E402,F401
    delete_netns, list_netns, netns_pids, proc_start_time, run, stop_pid, stop_proc)


def cleanup_stale() -> None:
    """Remove labs left by test processes that no longer exist."""
    for ns in list_netns():
        m = re.match(rf"^{LAB_PREFIX}(\d+)x", ns)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            delete_netns(ns)


# -- the lab ----------------------------------------------------------------------------------

@dataclass
class Namespace:
    """One node's namespace: `eth0` on the lab bridge with `underlay` (CIDR) on it."""

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

    def ping(self, dst: str, timeout: float = 1.0) -> bool:
        """One ICMP echo; True if the reply came back within `timeout`."""
        proc = self.run(sys.executable, "-c", PING_SCRIPT, dst, str(timeout), "1", "0",
                        timeout=timeout + 10, check=False)
        return proc.returncode == 0

    def pinger(self, dst: str, interval: float = 0.05, timeout: float = 1.0,
               out=None) -> subprocess.Popen:
        """Continuous echo to `dst`, one character per probe ('.' ok, 'x' lost) on stdout."""
        return self.spawn(sys.executable, "-c", PING_SCRIPT, dst, str(timeout), "0",
                          str(interval), stdout=out or subprocess.PIPE, text=True)

    def tcp_connect(self, host: str, port: int, timeout: float = 1.0) -> str:
        """'ok' (echoed), 'timeout' (dropped), 'refused' (RST) or 'error:<errno>'."""
        return self.run(sys.executable, "-c", TCP_CLIENT_SCRIPT, host, str(port), str(timeout),
                        timeout=timeout + 10).stdout.strip()

    def tcp_server(self, port: int, bind: str = "0.0.0.0") -> subprocess.Popen:
        """An echo server; returns once it listens (bounded wait on its 'listening' line)."""
        proc = self.spawn(sys.executable, "-c", TCP_SERVER_SCRIPT, bind, str(port),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        if not ready or proc.stdout.readline().strip() != b"listening":
            proc.kill()
            proc.wait(5)
            err = proc.stderr.read().decode(errors="replace").strip()
            raise RuntimeError(f"tcp server {self.name}:{port} did not start: {err}")
        return proc


@dataclass
class Lab:
    """Namespaces on one bridge, torn down by name; processes ended by pid."""

    tag: str = field(default_factory=lambda: f"{LAB_PREFIX}{os.getpid()}x{next(_counter)}")
    namespaces: dict[str, Namespace] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    pids: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, start time)
    finalizers: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.hub = f"{self.tag}-hub"
        run(["ip", "netns", "add", self.hub])
        try:
            run(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
            run(["ip", "-n", self.hub, "link", "set", "br0", "up"])
        except BaseException:
            delete_netns(self.hub)
            raise

    def add(self, label: str, underlay: str) -> Namespace:
        """A namespace with `eth0` (address `underlay`) plugged into the bridge, and lo up."""
        name = f"{self.tag}-{label}"
        run(["ip", "netns", "add", name])
        ns = Namespace(self, label, name, underlay)
        self.namespaces[label] = ns
        port = f"v{label}"
        run(["ip", "-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0",
             "netns", name])
        run(["ip", "-n", self.hub, "link", "set", port, "master", "br0", "up"])
        run(["ip", "-n", name, "addr", "add", underlay, "dev", "eth0"])
        run(["ip", "-n", name, "link", "set", "eth0", "up"])
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        if getattr(self, "gateway", None):
            run(["ip", "-n", name, "route", "add", "default", "via", self.gateway])
        return ns

    def connect_host(self, gateway: str = "192.0.2.254/24") -> str:
        """Let the lab's namespaces reach processes on the host (replicas, for agents).

        A veth pair joins the host and the hub namespace on a /30 of 203.0.113.0/24 picked
        per lab; the hub routes for the bridge (`gateway`) and masquerades towards the host,
        so the host needs no route to the lab's underlay (parallel labs can all use
        192.0.2.0/24). Returns the host-side address to bind servers to. Namespaces added
        afterwards get a default route via the gateway.
        """
        slot = (os.getpid() * 7 + next(_counter)) % 63
        host_ip, hub_ip = f"203.0.113.{4 * slot + 1}", f"203.0.113.{4 * slot + 2}"
        host_if = f"{self.tag}h"[-15:]
        run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", "up0", "netns", self.hub])
        self.on_close(lambda: run(["ip", "link", "del", host_if], check=False))
        run(["ip", "addr", "add", f"{host_ip}/30", "dev", host_if])
        run(["ip", "link", "set", host_if, "up"])
        run(["ip", "-n", self.hub, "addr", "add", f"{hub_ip}/30", "dev", "up0"])
        run(["ip", "-n", self.hub, "link", "set", "up0", "up"])
        run(["ip", "-n", self.hub, "addr", "add", gateway, "dev", "br0"])
        run(["ip", "netns", "exec", self.hub, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        run(["ip", "netns", "exec", self.hub, "nft", "-f", "-"], input=(
            "table ip lab_nat {\n chain post {\n  type nat hook postrouting priority 100;\n"
            '  oifname "up0" masquerade\n }\n}\n'))
        self.gateway = gateway.split("/")[0]
        for ns in self.namespaces.values():
            run(["ip", "-n", ns.name, "route", "add", "default", "via", self.gateway])
        return host_ip

    def ifname(self, label: str) -> str:
        """An interface name unique on the host (wireguard-go sockets are not per-namespace)."""
        name = f"rm{label}{os.getpid() % 100000}{next(_counter)}"
        if len(name) > 15:
            raise ValueError(f"interface name {name!r} too long")
        return name

    def track(self, proc: subprocess.Popen) -> None:
        self.procs.append(proc)

    def track_pid(self, pid: int | None) -> None:
        if pid:
            self.pids.append((pid, proc_start_time(pid)))

    def on_close(self, fn) -> None:
        """Run `fn` at close, before processes are ended (e.g. an interface's own close)."""
        self.finalizers.append(fn)

    def close(self) -> None:
        """Idempotent teardown; runs every step even if one fails, then re-raises the first."""
        errors: list[BaseException] = []
        for fn in reversed(self.finalizers):
            try:
                fn()
            except Exception as e:  # keep tearing down
                errors.append(e)
        self.finalizers.clear()
        for proc in self.procs:
            stop_proc(proc)
        self.procs.clear()
        for pid, start in self.pids:
            stop_pid(pid, start)
        self.pids.clear()
        for ns in [*(n.name for n in self.namespaces.values()), self.hub]:
            delete_netns(ns)
        self.namespaces.clear()
        if errors:
            raise errors[0]

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
