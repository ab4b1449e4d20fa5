"""The WireGuard driver: one interface, its peers and the routes to their allowed IPs.

Userspace `wireguard-go` is the default here (no kernel module on many hosts, including CI);
the kernel module is used behind the same class when present. wireguard-go runs as our own
foreground child (`WG_PROCESS_FOREGROUND=1`), so we hold its pid and can always end it,
inside a network namespace through `ip netns exec` when one is given.

`reconcile` is the hot path: a netmap change must touch only what changed. It reads the
device, computes the difference with pure functions (`compute_peer_ops`,
`compute_route_ops`, unit-tested without root), applies all peer changes in one request
and adds or removes only the routes that differ. It never brings the link down and never
rewrites an unchanged peer, so other peers' sessions keep flowing. With wireguard-go the
device is read and changed on its control socket (wireguard_uapi: no process start per
step); with the kernel module through `wg show <if> dump` and `wg set`.

Secrets: the private key goes to wireguard-go's socket or to `wg` on stdin only, and is
validated before, so that `wg`'s own error messages (which echo a bad key) are never
needed; the device's private and preshared keys are dropped as soon as they are parsed.
No key appears in argv, logs or errors.
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from raftmesh.proto.wire import IPV4_POOL, IPV6_POOL, Peer

ROUTE_PROTO = "82"  # marks routes this driver owns, so it never deletes anyone else's
OVERLAY_ROUTES = (IPV4_POOL, IPV6_POOL)  # the mesh's covering routes (see desired_routes)
WG_RUN_DIR = "/var/run/wireguard"  # wireguard-go's control sockets; shared by all netns
FRESH_SPACING = 0.05  # seconds between two first initiations to one peer (set_endpoint)
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.=+-]{1,15}$")
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


class WireGuardError(RuntimeError):
    """A wg/ip/wireguard-go step failed. Messages never contain key material."""


# -- pure part: parsing and diffing -------------------------------------------------------

@dataclass(frozen=True)
class PeerConfig:
    """The part of a peer that reconcile manages, as the device reports it."""

    public_key: str
    endpoint: str | None
    allowed_ips: tuple[str, ...]  # canonical CIDRs, sorted
    keepalive: int = 0  # seconds; 0 = off


@dataclass(frozen=True)
class PeerStats:
    public_key: str
    endpoint: str | None
    latest_handshake: float | None  # unix seconds; None = never
    rx_bytes: int
    tx_bytes: int

    @property
    def heard_from(self) -> bool:
        """A completed handshake, or an initiation we answered: WireGuard shows that handshake
        only once the peer's first data confirms it, but its bytes count at once."""
        return self.latest_handshake is not None or self.rx_bytes > 0


@dataclass(frozen=True)
class DeviceDump:
    """`wg show <if> dump` without its secrets (private and preshared keys are dropped)."""

    public_key: str | None
    listen_port: int
    peers: dict[str, PeerConfig] = field(default_factory=dict)
    stats: dict[str, PeerStats] = field(default_factory=dict)


@dataclass(frozen=True)
class DesiredPeer:
    """What the netmap wants for one peer; any of `endpoints` is acceptable."""

    public_key: str
    endpoints: tuple[str, ...]
    allowed_ips: tuple[str, ...]
    keepalive: int = 0


@dataclass(frozen=True)
class PeerOp:
    """One peer's change; None fields are left as they are on the device."""

    public_key: str
    remove: bool = False
    endpoint: str | None = None
    allowed_ips: tuple[str, ...] | None = None
    keepalive: int | None = None
    fresh: bool = False  # removed and added again: a new session (see _peer_op)

    def wg_args(self) -> list[str]:
        """Arguments for this peer inside a `wg set <if> ...` command line."""
        args = ["peer", self.public_key]
        if self.remove:
            return args + ["remove"]
        if self.fresh:
            args += ["remove", "peer", self.public_key]
        if self.endpoint is not None:
            args += ["endpoint", self.endpoint]
        if self.allowed_ips is not None:
            args += ["allowed-ips", ",".join(self.allowed_ips)]
        if self.keepalive is not None:
            args += ["persistent-keepalive", str(self.keepalive) if self.keepalive else "off"]
        return args


def canonical_prefixes(prefixes: Iterable[str]) -> tuple[str, ...]:
    """Sorted, de-duplicated canonical CIDRs, so device and netmap compare equal."""
    nets = {ipaddress.ip_network(p.strip(), strict=False) for p in prefixes if p.strip()}
    return tuple(str(n) for n in sorted(nets, key=lambda n: (n.version, n.network_address,
                                                              n.prefixlen)))


def canonical_endpoint(endpoint: str) -> str:
    """`ip:port` as wg prints it (IPv6 in brackets, compressed); host names kept as given."""
    host, sep, port = endpoint.rpartition(":")
    if not sep:
        raise ValueError(f"endpoint {endpoint!r} has no port")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return endpoint
    return f"[{ip}]:{int(port)}" if ip.version == 6 else f"{ip}:{int(port)}"


def check_key(key: str, what: str = "public key") -> str:
    """A base64 32-byte WireGuard key; the error never repeats the value."""
    try:
        ok = len(base64.b64decode(key, validate=True)) == 32
    except (binascii.Error, ValueError, TypeError):
        ok = False
    if not ok:
        raise ValueError(f"{what} is not a base64-encoded 32-byte key")
    return key


def _none(text: str) -> str | None:
    return None if text in ("(none)", "") else text


def parse_dump(text: str) -> DeviceDump:
    """Parse `wg show <if> dump`. Raises ValueError naming a line number, never its content."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError("empty wg dump")
    head = lines[0].split("\t")
    if len(head) != 4:
        raise ValueError("malformed wg dump line 1")
    public_key, listen_port = _none(head[1]), int(head[2])
    peers: dict[str, PeerConfig] = {}
    stats: dict[str, PeerStats] = {}
    for n, line in enumerate(lines[1:], start=2):
        f = line.split("\t")
        if len(f) != 8:
            raise ValueError(f"malformed wg dump line {n}")
        key, endpoint = f[0], _none(f[2])
        allowed = () if _none(f[3]) is None else canonical_prefixes(f[3].split(","))
        keepalive = 0 if f[7] == "off" else int(f[7])
        peers[key] = PeerConfig(key, endpoint, allowed, keepalive)
        hs = int(f[4])
        stats[key] = PeerStats(key, endpoint, float(hs) if hs else None, int(f[5]), int(f[6]))
    return DeviceDump(public_key, listen_port, peers, stats)


def desired_peers(peers: Iterable[Peer], keepalive: int = 0,
                  self_key: str | None = None) -> dict[str, DesiredPeer]:
    """The netmap's peers keyed by WireGuard public key (our own key is never a peer)."""
    out: dict[str, DesiredPeer] = {}
    for p in peers:
        check_key(p.node_key)
        if p.node_key == self_key:
            continue
        out[p.node_key] = DesiredPeer(
            public_key=p.node_key,
            endpoints=tuple(canonical_endpoint(e) for e in p.endpoints),
            allowed_ips=canonical_prefixes(p.allowed_ips),
            keepalive=keepalive,
        )
    return out


def keepalive_once_handshaken(desired: dict[str, DesiredPeer], current: dict[str, PeerConfig],
                              stats: dict[str, PeerStats]) -> dict[str, DesiredPeer]:
    """`desired` with persistent keepalive only for peers that completed a handshake or
    already have it (`WireGuardInterface.arm_keepalive` arms it after the first handshake).

    wireguard-go sends a keepalive, so a first handshake initiation, the moment a peer gets
    one. When a node joins, it and its peers add each other within milliseconds, and two
    initiations that cross are both lost: each side replaces its own handshake in progress by
    the one it answers and drops the answer to its own, so both wait WireGuard's 5 s retry
    (the 5 s relayed rounds of `bench connect`). So the agent gives keepalive at once only to
    the peers of its first netmap (it joins, or restarted: its peers may hold a session its
    new wireguard-go lost, which its initiation replaces at once); a peer that joins later
    is the one to initiate, and here only traffic does until the first handshake. NAT
    mappings meanwhile are held by the path probes (agent/disco.py), which ping a held path
    every second."""
    out = {}
    for key, want in desired.items():
        st, cur = stats.get(key), current.get(key)
        if want.keepalive and not (st is not None and st.latest_handshake is not None) \
                and not (cur is not None and cur.keepalive == want.keepalive):
            want = replace(want, keepalive=0)
        out[key] = want
    return out


def _peer_op(cur: PeerConfig | None, want: DesiredPeer) -> PeerOp | None:
    """The change turning `cur` into `want`, or None when nothing differs.

    A peer that takes routes over (a standby router becoming a subnet's primary, the exit
    node chosen) is removed and added again, so the first packet for those routes starts a
    new handshake at once: the session held may be one its restarted agent no longer knows
    (a router killed and back as the standby), and WireGuard would send into it until its
    5 s handshake retry or 15 s of silence, a failover's first reply seconds late."""
    if cur is not None and any(_is_route(p) for p in set(want.allowed_ips) - set(cur.allowed_ips)):
        endpoint = cur.endpoint if cur.endpoint in want.endpoints or not want.endpoints \
            else want.endpoints[0]
        return PeerOp(want.public_key, endpoint=endpoint, allowed_ips=want.allowed_ips,
                      keepalive=want.keepalive or None, fresh=True)
    endpoint = None
    if want.endpoints and (cur is None or cur.endpoint not in want.endpoints):
        # Keep an endpoint that is one of the acceptable ones (it may have roamed there).
        endpoint = want.endpoints[0]
    allowed = want.allowed_ips if cur is None or cur.allowed_ips != want.allowed_ips else None
    keepalive = want.keepalive if cur is None or cur.keepalive != want.keepalive else None
    if cur is not None and endpoint is None and allowed is None and keepalive is None:
        return None
    if cur is None and not want.keepalive:
        keepalive = None  # off is the default for a new peer
    return PeerOp(want.public_key, endpoint=endpoint, allowed_ips=allowed, keepalive=keepalive)


def _is_route(prefix: str) -> bool:
    """A prefix wider than one address: a subnet or exit route, not a peer's own address."""
    net = ipaddress.ip_network(prefix)
    return net.prefixlen < net.max_prefixlen


def compute_peer_ops(current: dict[str, PeerConfig],
                     desired: dict[str, DesiredPeer]) -> list[PeerOp]:
    """Removals first (they may free allowed IPs that another peer now claims), then
    additions and changes; unchanged peers produce nothing."""
    ops = [PeerOp(k, remove=True) for k in sorted(set(current) - set(desired))]
    for key in sorted(desired):
        op = _peer_op(current.get(key), desired[key])
        if op is not None:
            ops.append(op)
    return ops


def desired_routes(desired: dict[str, DesiredPeer],
                   covering: Sequence[str] = OVERLAY_ROUTES) -> set[str]:
    """Routes to install: the `covering` routes (the overlay pools), and every allowed IP
    they do not cover (subnet routes) except default routes, which would swallow the
    underlay (exit nodes need policy routing, not a plain route).

    One route per pool covers every peer's own addresses, as Tailscale's covering route
    does: WireGuard's allowed IPs then choose the peer, and a peer that joins needs no
    route change, which was the one process the agent still started on a new peer's path
    (`ip -batch`, 10-20 ms on a loaded machine). The pools are the protocol's, not the
    operator's; the more specific routes of an underlay inside 100.64.0.0/10 (a carrier's
    NAT) still win."""
    nets = [ipaddress.ip_network(c) for c in covering]

    def needs_route(prefix: str) -> bool:
        net = ipaddress.ip_network(prefix)
        return net.prefixlen != 0 and not any(net.version == c.version and net.subnet_of(c)
                                              for c in nets)
    return set(canonical_prefixes(covering)) | {p for d in desired.values()
                                                for p in d.allowed_ips if needs_route(p)}


def compute_route_ops(current: set[str], desired: set[str]) -> tuple[list[str], list[str]]:
    """(routes to add, routes to remove), both canonical and sorted."""
    return (list(canonical_prefixes(desired - current)),
            list(canonical_prefixes(current - desired)))


def kernel_wireguard_available() -> bool:
    """Whether the kernel module is loaded, built in, or installed for this kernel."""
    if os.path.isdir("/sys/module/wireguard"):
        return True
    release = os.uname().release
    for name in ("modules.builtin", "modules.dep"):
        try:
            with open(f"/lib/modules/{release}/{name}") as f:
                if "/wireguard.ko" in f.read():
                    return True
        except OSError:
            pass
    return False


# -- side effects ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ReconcileResult:
    peer_ops: tuple[PeerOp, ...]
    routes_added: tuple[str, ...]
    routes_removed: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return bool(self.peer_ops or self.routes_added or self.routes_removed)


class WireGuardInterface:
    """One WireGuard interface, in the current network namespace or in `netns`.

    Use: `create()`, `configure(...)`, then `reconcile(peers, keepalive)` on every netmap;
    `close()` (or the context manager) ends wireguard-go by pid and removes the interface.
    """

    def __init__(self, name: str, netns: str | None = None, *, kernel: bool | None = None,
                 wireguard_go: str = "wireguard-go",
                 covering_routes: Sequence[str] = OVERLAY_ROUTES):
        if not IFNAME_RE.match(name):
            raise ValueError(f"invalid interface name {name!r} (at most 15 characters)")
        self.name = name
        self.netns = netns
        self.kernel = kernel_wireguard_available() if kernel is None else kernel
        self.wireguard_go = wireguard_go
        self.covering_routes = tuple(covering_routes)  # () for a tunnel outside the mesh
        self._proc: subprocess.Popen | None = None
        self._log = None
        self._fresh_at: dict[str, float] = {}  # peer key -> when its last first initiation left
        # What this driver set, so the hot path need not ask `ip` (None: unknown, ask). A link
        # it created has neither routes nor addresses yet.
        self._installed_routes: set[str] | None = None
        self._own_addresses: set[str] | None = None
        self._pending: subprocess.Popen | None = None  # see assign_addresses_soon

    # commands -----------------------------------------------------------------------------
    def _in_ns(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def _ip(self, *args: str) -> list[str]:
        return ["ip", *(["-n", self.netns] if self.netns else []), *args]

    def _run(self, argv: list[str], *, input: str | None = None, secret: bool = False,
             check: bool = True) -> subprocess.CompletedProcess:
        """Run a command; with `secret`, stdin holds a key and stderr is kept out of errors."""
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=30)
        if check and proc.returncode != 0:
            detail = "(details withheld: key material)" if secret else proc.stderr.strip()[:2000]
            cmd = " ".join(argv)[:300]  # argv never holds a key
            raise WireGuardError(f"{cmd} failed (exit {proc.returncode}): {detail}")
        return proc

    def _wg(self, *args: str, input: str | None = None, secret: bool = False,
            check: bool = True) -> subprocess.CompletedProcess:
        return self._run(self._in_ns(["wg", *args]), input=input, secret=secret, check=check)

    # lifecycle ----------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """wireguard-go's pid while it runs (None with the kernel module)."""
        return self._proc.pid if self._proc and self._proc.poll() is None else None

    @property
    def socket_path(self) -> str:
        return os.path.join(WG_RUN_DIR, f"{self.name}.sock")

    def _socket_alive(self) -> bool:
        return socket_alive(self.socket_path)

    def link_exists(self) -> bool:
        return self._run(self._ip("link", "show", "dev", self.name), check=False).returncode == 0

    def create(self) -> None:
        """Create the interface (down, no key yet)."""
        if self.kernel:
            self._run(self._ip("link", "add", "dev", self.name, "type", "wireguard"))
            self._installed_routes, self._own_addresses = set(), set()
            return
        if self._socket_alive():
            raise WireGuardError(f"a wireguard-go already serves {self.name}; names must be "
                                 f"unique across network namespaces")
        self._log = tempfile.TemporaryFile()
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1")
        self._proc = subprocess.Popen(self._in_ns([self.wireguard_go, self.name]), env=env,
                                      stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT)
        try:
            self._wait_started()
        except BaseException:
            self.close()
            raise
        self._installed_routes, self._own_addresses = set(), set()

    def _wait_started(self) -> None:
        """Wait (bounded) until wireguard-go answers on its socket and the link exists."""
        deadline = time.monotonic() + START_TIMEOUT
        while not (self._socket_alive() and self.link_exists()):
            if self._proc.poll() is not None:
                raise WireGuardError(f"wireguard-go {self.name} exited with "
                                     f"{self._proc.returncode}: {self._log_tail()}")
            if time.monotonic() > deadline:
                raise WireGuardError(f"wireguard-go {self.name} not ready after "
                                     f"{START_TIMEOUT}s: {self._log_tail()}")
            time.sleep(0.02)

    def _log_tail(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read()[-2000:].decode(errors="replace").strip()

    def configure(self, private_key: str, listen_port: int, addresses: Sequence[str],
                  mtu: int | None = None) -> None:
        """Set key and port, assign overlay addresses and bring the link up."""
        check_key(private_key, "private key")
        if self.kernel:
            self._wg("set", self.name, "private-key", "/dev/stdin", "listen-port", str(listen_port),
                     input=private_key + "\n", secret=True)
        else:
            uapi.set_device(self.socket_path, [f"private_key={uapi.hex_key(private_key)}",
                                               f"listen_port={listen_port}"])
        lines = self._address_lines(addresses)
        if mtu is not None:
            lines.append(f"link set dev {self.name} mtu {mtu}")
        lines.append(f"link set dev {self.name} up")
        lines += [f"route replace {p} dev {self.name} proto {ROUTE_PROTO}"
                  for p in self.covering_routes]
        self._batch(lines)
        if self._installed_routes is not None:
            self._installed_routes |= set(canonical_prefixes(self.covering_routes))

    def close(self) -> None:
        """Stop wireguard-go by its pid and remove the interface; safe to call twice."""
        self._settle()
        if self._proc is not None:
            _stop(self._proc)
            self._proc = None
        if self.kernel or self.link_exists():
            self._run(self._ip("link", "del", "dev", self.name), check=False)
        if not self.kernel:
            remove_stale_socket(self.socket_path)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "WireGuardInterface":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # state --------------------------------------------------------------------------------
    def dump(self) -> DeviceDump:
        if not self.kernel:
            return uapi.get(self.socket_path)
        proc = self._wg("show", self.name, "dump", check=False)
        if proc.returncode != 0:
            raise WireGuardError(f"wg show {self.name} dump failed: {proc.stderr.strip()[:500]}")
        return parse_dump(proc.stdout)

    def public_key(self) -> str | None:
        return self.dump().public_key

    def peer_stats(self) -> dict[str, PeerStats]:
        """Per-peer latest handshake and transfer counters, keyed by public key."""
        return self.dump().stats

    def addresses(self) -> set[str]:
        """Global-scope addresses on the interface, as CIDRs."""
        out = json.loads(self._run(self._ip("-j", "addr", "show", "dev", self.name)).stdout)
        return {f"{a['local']}/{a['prefixlen']}" for link in out
                for a in link.get("addr_info", []) if a.get("scope") == "global"}

    def set_addresses(self, addresses: Sequence[str]) -> None:
        """Make the interface's addresses exactly `addresses` (CIDR each), touching only diffs."""
        self._batch(self._address_lines(addresses))

    def assign_addresses_soon(self, addresses: Sequence[str]) -> None:
        """set_addresses without waiting: `ip` runs while the caller goes on (a new node
        opens its map stream meanwhile, so its first netmap finds the addresses set, one
        process start off the path to the first packet). The next use of the driver waits
        for it; if it failed, the driver asks `ip` what the link has."""
        lines = self._address_lines(addresses)
        if not lines:
            return
        self._pending = subprocess.Popen(self._ip("-batch", "-"), stdin=subprocess.PIPE,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         text=True)
        try:
            self._pending.stdin.write("\n".join(lines) + "\n")
            self._pending.stdin.close()
        except OSError:
            self._settle()

    def _settle(self) -> None:
        """Wait for an assign_addresses_soon still running."""
        proc, self._pending = self._pending, None
        if proc is not None and proc.wait(timeout=30) != 0:
            self._own_addresses = None

    def _address_lines(self, addresses: Sequence[str]) -> list[str]:
        """`ip -batch` lines that make the addresses `addresses`; assumes they will be run."""
        self._settle()
        want = {str(ipaddress.ip_interface(a)) for a in addresses}
        have = self._own_addresses if self._own_addresses is not None else \
            {str(ipaddress.ip_interface(a)) for a in self.addresses()}
        self._own_addresses = want
        return [f"address del {a} dev {self.name}" for a in sorted(have - want)] + \
               [f"address add {a} dev {self.name}" for a in sorted(want - have)]

    def _batch(self, lines: list[str]) -> None:
        """Run `ip` commands in one process; what this driver remembers of the link is
        forgotten if they fail (it asks `ip` again next time)."""
        self._settle()
        if not lines:
            return
        try:
            self._run(self._ip("-batch", "-"), input="\n".join(lines) + "\n")
        except BaseException:
            self._own_addresses = self._installed_routes = None
            raise

    def add_host_address(self, address: str) -> None:
        """An address for local services only (MagicDNS's): host scope, so the kernel never
        picks it as the source of traffic into the tunnel, and `addresses` leaves it out."""
        self._run(self._ip("addr", "replace", f"{address}/32", "dev", self.name, "scope", "host"))

    def routes(self) -> set[str]:
        """Routes this driver installed on the interface (marked with ROUTE_PROTO)."""
        found: set[str] = set()
        for fam in ("-4", "-6"):
            out = self._run(self._ip("-j", fam, "route", "show", "table", "main", "dev",
                                     self.name, "proto", ROUTE_PROTO)).stdout
            found.update(canonical_prefixes(r["dst"] for r in json.loads(out or "[]")))
        return found

    def _apply_routes(self, add: list[str], remove: list[str]) -> None:
        """All route changes in one `ip -batch` run."""
        self._batch([f"route replace {p} dev {self.name} proto {ROUTE_PROTO}" for p in add] +
                    [f"route del {p} dev {self.name} proto {ROUTE_PROTO}" for p in remove])

    def set_endpoint(self, public_key: str, endpoint: str, keepalive: int = 0) -> bool:
        """Point one existing peer at `endpoint` (a path a probe proved, or the relay).

        A peer that has not completed a handshake yet is removed and added again
        (`_first_initiation_again`): wireguard-go counts a handshake it could not send (no
        endpoint yet), or one sent on the old path, and would wait its 5 s retry before
        trying the new endpoint. If we had sent an initiation, we have traffic for the peer:
        the re-added peer gets `keepalive`, so a new initiation leaves at once. Not so a
        peer that sent us something: we answered its initiation, and WireGuard shows that
        handshake only when the peer's first data confirms it, so a re-add would throw the
        session away while the peer sends into it until its 15 s timeout. Whether anything
        changed."""
        check_key(public_key)
        endpoint = canonical_endpoint(endpoint)
        dump = self.dump()
        cur = dump.peers.get(public_key)
        if cur is None or cur.endpoint == endpoint:
            return False
        stats = dump.stats[public_key]
        if stats.heard_from:
            self._set_peers([PeerOp(public_key, endpoint=endpoint)])
            return True
        return self._first_initiation_again(public_key, endpoint,
                                            (keepalive if stats.tx_bytes else cur.keepalive) or None, dump)

    def retry_unanswered(self, public_key: str, keepalive: int) -> bool:
        """Send a first initiation to a peer at once if ours went unanswered (sent, nothing
        back): the peer just told us that it knows us now (agent/paths.py), so ours most
        likely reached it before its netmap did and was dropped, and WireGuard would wait
        its 5 s retry. The re-added peer gets `keepalive`, which makes it initiate now."""
        check_key(public_key)
        dump = self.dump()
        cur, stats = dump.peers.get(public_key), dump.stats.get(public_key)
        if cur is None or cur.endpoint is None or stats is None or not stats.tx_bytes or stats.heard_from:
            return False
        return self._first_initiation_again(public_key, cur.endpoint, keepalive or None, dump,
                                            only_if_unanswered=True)

    def _first_initiation_again(self, public_key: str, endpoint: str, keepalive: int | None,
                                dump: DeviceDump, only_if_unanswered: bool = False) -> bool:
        """Remove and add the peer again in one `wg set`: a new first initiation leaves.

        It is kept FRESH_SPACING after the peer's last first initiation (a re-add, or
        `reconcile` adding it with an endpoint): the receiver drops an initiation that follows
        the previous one within 20 ms (flood) or carries the same timestamp (wireguard-go
        rounds them to ~17 ms); the dropped second initiation then waited the 5 s retry.
        `dump` is the device as the caller read it; after that wait it is read again, since
        an answer may have come meanwhile."""
        wait = self._fresh_at.get(public_key, -FRESH_SPACING) + FRESH_SPACING - time.monotonic()
        if wait > 0:
            time.sleep(wait)
            dump = self.dump()
        cur, stats = dump.peers.get(public_key), dump.stats.get(public_key)
        if cur is None or stats is None:
            return False
        if only_if_unanswered:
            if stats.heard_from or not stats.tx_bytes or cur.endpoint != endpoint:
                return False
        elif stats.heard_from:  # keep the session; only the endpoint moves
            if cur.endpoint == endpoint:
                return False
            self._set_peers([PeerOp(public_key, endpoint=endpoint)])
            return True
        self._set_peers([PeerOp(public_key, endpoint=endpoint, allowed_ips=cur.allowed_ips,
                                keepalive=keepalive, fresh=True)])
        now = time.monotonic()
        self._fresh_at = {k: t for k, t in self._fresh_at.items() if now - t < FRESH_SPACING}
        self._fresh_at[public_key] = now
        return True

    def arm_keepalive(self, public_keys: Iterable[str], keepalive: int) -> None:
        """Persistent keepalive for peers whose first handshake completed (see
        keepalive_once_handshaken); the caller knows they are on the device."""
        if keepalive:
            self._set_peers([PeerOp(k, keepalive=keepalive) for k in sorted(public_keys)])

    def reconcile(self, peers: Sequence[Peer], keepalive: int = 0,
                  new_peers_initiate: bool = True) -> ReconcileResult:
        """Make the device's peers and routes match `peers`, changing only the differences.
        Without `new_peers_initiate`, a peer gets `keepalive` only after its first handshake
        (keepalive_once_handshaken)."""
        dump = self.dump()
        desired = desired_peers(peers, keepalive, self_key=dump.public_key)
        if not new_peers_initiate:
            desired = keepalive_once_handshaken(desired, dump.peers, dump.stats)
        ops = compute_peer_ops(dump.peers, desired)
        self._set_peers(ops)
        now = time.monotonic()
        for op in ops:  # those sending a first initiation now: set_endpoint keeps its spacing
            stats = dump.stats.get(op.public_key)
            if op.endpoint is not None and (op.fresh or stats is None or stats.latest_handshake is None):
                self._fresh_at[op.public_key] = now
        if self._installed_routes is None:
            self._installed_routes = self.routes()
        want = desired_routes(desired, self.covering_routes)
        add, remove = compute_route_ops(self._installed_routes, want)
        self._apply_routes(add, remove)
        self._installed_routes = set(canonical_prefixes(want))
        return ReconcileResult(tuple(ops), tuple(add), tuple(remove))

    def _set_peers(self, ops: Sequence[PeerOp]) -> None:
        """All peer changes in one request."""
        if not ops:
            return
        if self.kernel:
            self._wg("set", self.name, *[a for op in ops for a in op.wg_args()])
        else:
            uapi.set_device(self.socket_path, [line for op in ops for line in uapi.peer_lines(op)])


def socket_alive(path: str) -> bool:
    """Whether a wireguard-go answers on the control socket at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def remove_stale_socket(path: str) -> None:
    """Unlink a control socket nobody listens on any more (its wireguard-go is gone, by
    SIGKILL for one: it removes its socket only when it stops cleanly)."""
    if os.path.exists(path) and not socket_alive(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM, bounded wait, then SIGKILL: the process is always gone and reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)


def generate_private_key() -> str:
    """A fresh base64 X25519 private key (WireGuard clamps it the same way libsodium does)."""
    from nacl.public import PrivateKey
    return base64.b64encode(bytes(PrivateKey.generate())).decode()


def public_key_of(private_key: str) -> str:
    from nacl.public import PrivateKey
    raw = base64.b64decode(check_key(private_key, "private key"))
    return base64.b64encode(bytes(PrivateKey(raw).public_key)).decode()


# Last: wireguard_uapi builds on the types above.
from . import wireguard_uapi as uapi  # noqa: E402
