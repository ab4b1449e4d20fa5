"""A small network-namespace lab for data-plane and end-to-end tests.

The lab itself is the benchmarks' (`raftmesh.lab.namespaces`), used here under the tests'
own names and with the traffic helpers below. A `Lab` is a set of namespaces named `rmlab<pid>x<n>-<label>`, each with an `eth0` veth
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

import os
import re
import select
import subprocess
import sys

LAB_PREFIX = "rmlab"

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
from raftmesh.lab import namespaces  # noqa: E402
from raftmesh.lab.namespaces import delete_netns, list_netns, netns_pids  # noqa: E402,F401
from raftmesh.lab.processes import proc_start_time, run, stop_pid, stop_proc  # noqa: E402,F401


def cleanup_stale() -> None:
    """Remove labs left by test processes that no longer exist."""
    for ns in list_netns():
        m = re.match(rf"^{LAB_PREFIX}(\d+)x", ns)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            delete_netns(ns)


# -- the lab ----------------------------------------------------------------------------------

class Namespace(namespaces.Namespace):
    """One node's namespace, with the traffic helpers the tests use."""

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


class Lab(namespaces.Lab):
    """The benchmarks' lab under the tests' own names (`rmlab...`, interfaces `rm...`)."""

    prefix = LAB_PREFIX
    ifname_prefix = "rm"
    namespace_cls = Namespace


class AgentsLab:
    """A lab with a local cluster and real agents (set up by subclasses); close() ends the
    agents, then the replicas, then the namespaces. Use it with contextlib.closing."""

    def __init__(self):
        cleanup_stale()
        self.lab, self.cluster, self.agents = Lab(), None, {}

    def start_cluster(self, tmp: str, host: str) -> None:
        """Three replicas on `host` with the benchmarks' users and mesh policy; `key` is the
        bench user's reusable pre-auth key."""
        from raftmesh.bench import harness
        from raftmesh.lab.local_cluster import LocalCluster
        self.tmp = tmp
        self.cluster = LocalCluster(os.path.join(tmp, "cluster"), replicas=3, host=host,
                                    extra_args=["--stream-keepalive", "2"])
        self.cluster.start_all()
        self.cluster.wait_ready(timeout=30)
        self.key = harness.setup_cluster(self.cluster, topology="mesh")[harness.BENCH_USER]
        self.servers = [r.api_url for r in self.cluster.replicas]

    def start(self, label: str, key: str | None = None) -> None:
        """Start (or restart) the agent in namespace `label`, first with `key` (default: the
        bench user's key)."""
        agent = self.agents.get(label) or namespaces.RealAgent(
            self.lab, self.ns[label], self.tmp, self.servers, key or self.key, label)
        self.agents[label] = agent
        agent.start()

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        if self.cluster is not None:
            self.cluster.stop_all()
        self.lab.close()
