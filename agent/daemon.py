"""The node daemon: register, stream the netmap from any replica, drive WireGuard and nftables.

The data plane must outlive the control plane. The daemon applies the last verified netmap
from its state directory before it talks to any replica, so tunnels come back after a
restart during a full outage; while disconnected it keeps enforcing key expiry by local
time. What to do when (register, fail over, back off, ack, revoke) is decided by its
AgentSession (agent/session.py); this module does the I/O: HTTP, the state directory,
WireGuard and nftables.
"""
from __future__ import annotations

import base64
import dataclasses
import ipaddress
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from raftmesh.proto.routes import REGISTER, REPORT, ROTATE_KEY
from raftmesh.proto.version import PROTOCOL_VERSION, UNSUPPORTED
from raftmesh.proto.wire import Netmap, node_addresses

from .ack_sender import AckSender
from .control_client import ControlClient, ControlError
from .dns_server import DnsServer
from .exit_node import ExitRouting, find_exit_node, wireguard_peers
from .firewall import PacketFilter
from .forwarding import Forwarding, unreachable_routes
from .magic_dns import SERVICE_ADDRESS, DnsTable
from .map_client import MapStream
from .netmap_state import AgentNetmap, next_expiry
from .paths import PathProber, split_endpoint
from .relay import RelayClient
from .resolv_conf import RESOLV_CONF, HostResolver, nameservers
from .session import APPLY, APPLY_ARM_ACK, END, REVOKED, AgentSession, Next
from .state_dir import StateDir
from .wireguard import WireGuardError, WireGuardInterface, public_key_of

log = logging.getLogger("raftmesh.agent")
DEFAULT_MAX_STALE = 7 * 86400.0
WG_PID_FILE = "wireguard-go.pid"
ROUTE_CHECK_SECONDS = 5.0
EXIT_NODE_FILE = "exit_node.json"  # the exit node last reported in use (state directory)
PATHS_READY_WAIT = 2.0  # seconds a first registration waits for the prober and relay threads


@dataclass
class AgentConfig:
    servers: list[str]
    state_dir: str
    interface: str
    auth_key: str | None = field(default=None, repr=False)
    hostname: str = ""
    listen_port: int = 41641
    endpoints: list[str] = field(default_factory=list)  # ip:port peers should use
    advertise_routes: list[str] = field(default_factory=list)
    peer_keepalive: int = 25  # WireGuard persistent keepalive, seconds (holds NAT mappings)
    stun_servers: list[str] = field(default_factory=list)  # host:port, besides the replicas'
    max_stale: float = DEFAULT_MAX_STALE  # stop enforcing a netmap this long without contact
    dns_config: bool = True  # point the host's resolver at MagicDNS (agent/resolv_conf.py)
    resolv_conf: str = RESOLV_CONF
    masquerade: bool = True  # routed traffic leaves as this router's address (forwarding.py)
    exit_node: str | None = None  # the peer (id, name or address) to reach the internet by
    exit_node_allow_lan: bool = False  # with an exit node, keep reaching the local networks

    def __post_init__(self) -> None:
        if not self.hostname:
            self.hostname = os.uname().nodename.split(".")[0][:63] or "node"


class Agent:
    """The daemon's I/O around one AgentSession (agent/session.py), which decides."""

    def __init__(self, config: AgentConfig):
        self.config = config
        self.state = StateDir(config.state_dir)
        self.machine_key = self.state.machine_key()
        self.client = ControlClient(config.servers, self.machine_key, timeout=10.0)
        self.stop_event = threading.Event()
        self.rotate_event = threading.Event()
        registration = self.state.read_json("registration.json")
        cached = self.state.read_json("netmap.json")
        view, last_contact = None, None
        if registration and cached and cached.get("node_id") == registration["node_id"]:
            view = AgentNetmap(registration["node_id"], registration["pinned"],
                               Netmap.from_json(cached["netmap"]))
            last_contact = cached.get("saved_at")
        elif registration:
            view = AgentNetmap(registration["node_id"], registration["pinned"])
        # an --auth-key is offered once per run (re-authenticates an expired node)
        self.session = AgentSession(random.Random(), view, bool(config.auth_key),
                                    last_contact=last_contact)
        self._reported: tuple[str, ...] | None = None  # endpoints last reported this run
        self._routes_reported: tuple | None = None  # (advertised, unreachable) reported this run
        self._routes_checked = 0.0  # monotonic time of the last subnet reachability check
        self._registration_unsaved = False  # registered; registration.json not yet written
        self._exit_node_used: str | None = None  # the exit node (id) the enforced netmap uses
        # what the control plane last heard, across runs: a restart without --exit-node
        # tells it once that the exit node is no longer used
        self._exit_node_reported = (self.state.read_json(EXIT_NODE_FILE) or {}).get("node")
        self._report_lock = threading.Lock()  # the prober's thread reports a new mapping too
        self._status_lock = threading.Lock()
        # WireGuard's peers change from three threads: a netmap (main), a path proved or lost
        # (prober), the relay's session up or moved (relay). Paths are read and written under
        # this lock, so a relay session that comes up while the first netmap is applied cannot
        # leave a peer without the endpoint it would have had either way (its first handshake
        # then waited for the other side's, 5 s when that one was lost).
        self._paths_lock = threading.RLock()
        self.mapped: str | None = None  # our WireGuard port as STUN sees it
        self.prober: PathProber | None = None
        self._appeared: dict[str, float] = {}  # peer key -> when it entered the netmap, until
        self._setup_times: list[float] = []     # its first handshake; then reported in acks
        self._peer_since: dict[str, float] = {}  # peer key -> wall time it entered the netmap
        self.relay: RelayClient | None = None
        self.ack_sender = AckSender(self.machine_key)
        self.wg: WireGuardInterface | None = None
        self.fw: PacketFilter | None = None
        self.forwarding: Forwarding | None = None
        self.exit_routing: ExitRouting | None = None
        self.status: dict = {"state": "starting", "server": None, "replica": None}
        self.stream: MapStream | None = None
        self.login_url_shown: str | None = None
        self.dns: DnsServer | None = None
        self.host_resolver = HostResolver(self.state.path, config.interface, config.resolv_conf) \
            if config.dns_config else None
        self._host_upstreams: list[str] = []

    @property
    def view(self) -> AgentNetmap | None:
        return self.session.view

    # -- lifecycle ---------------------------------------------------------------------------
    def run(self) -> None:
        log.info("starting")
        self._start_paths()
        try:
            self._start_dataplane()
        except BaseException:
            self._stop_dataplane()
            raise
        log.info("data plane up")
        if self.session.registration_due:
            self._wait_paths_ready()
        try:
            self._enforce()  # the cached netmap, before any replica is reachable
            while not self.stop_event.is_set():
                self._follow(self._attempt())
        finally:
            self.ack_sender.close()
            self._stop_dataplane()

    def stop(self, *_args) -> None:
        self.stop_event.set()
        stream = self.stream
        if stream is not None:
            stream.close()

    def _follow(self, nxt: Next | None) -> None:
        """Do what the session decided after an attempt: revoke, move on, wait."""
        if nxt is None:
            return
        self._publish_status()
        if nxt.revoked:
            self._save_cache()
            self._enforce()
        if nxt.rotate:
            self.client.rotate()
        if nxt.wait:
            self._idle(nxt.wait)

    def _idle(self, seconds: float) -> None:
        """Wait (interruptibly) while still enforcing local key expiry."""
        end = time.monotonic() + seconds
        while not self.stop_event.is_set() and time.monotonic() < end:
            self.stop_event.wait(min(1.0, max(0.0, end - time.monotonic())))
            self._enforce()

    # -- one connection attempt ---------------------------------------------------------------
    def _attempt(self) -> Next | None:
        """Register if due, then stream until the stream ends."""
        session = self.session
        try:
            if session.registration_due:
                nxt = self._register()
                if nxt is not None:
                    return nxt
            self.stream = MapStream(self.client.server, self.machine_key, session.since,
                                    read_timeout=35.0)
        except ControlError as e:
            return self._refused(e)
        except (OSError, ValueError) as e:
            log.info("cannot reach %s: %s", self.client.server, e)
            return session.unreachable(str(e))
        stream = self.stream
        try:
            reason = self._consume(stream)
        finally:
            stream.close()
            self.stream = None
        nxt = session.stream_ended(reason)
        log.info("stream from %s ended: %s", stream.replica or stream.server, session.end_reason)
        return nxt

    def _refused(self, e: ControlError) -> Next:
        return self._log_refusal(e, self.session.refused(e.status, e.code, e.message))

    def _log_refusal(self, e: ControlError, nxt: Next) -> Next:
        if e.status >= 500:
            log.info("%s answered %s; trying the next replica", self.client.server, e)
        elif e.code == UNSUPPORTED:
            log.error("%s does not serve this agent's protocol version %d: %s. Upgrade the agent "
                      "(or the replicas, if the agent is newer); asking again in %gs",
                      self.client.server, PROTOCOL_VERSION, e.message, nxt.wait)
        else:
            log.warning("control plane refused this node: %s", e)
        return nxt

    def _consume(self, stream: MapStream) -> str | None:
        """Frames into the session until it ends the stream; None, or why it ended here."""
        session = self.session
        session.stream_opened(stream.nonce, stream.stream_keys, stream.keepalive, time.monotonic())
        log.info("map stream from %s open", stream.replica or stream.server)
        self._publish_status(stream)
        self._set_stun_servers(stream)
        while not self.stop_event.is_set():
            if self.rotate_event.is_set():
                self.rotate_event.clear()
                self._rotate_wireguard_key()
            now = time.monotonic()
            ack = session.take_ack(now)
            if ack is not None:
                self.ack_sender.send(stream.server, self._with_paths_report(ack),
                                     session.view.stream_auth, stream.ack_addr)
            item = stream.next(timeout=session.poll_timeout(now))
            if item is None:
                if session.silent(time.monotonic()):
                    return None
                self._enforce()
                self._track_setup()
                self._report_routes()
                self._report_exit_node()
                continue
            kind, payload = item
            if kind != "frame":
                return f"{kind}: {payload}"
            action, verdict = session.frame(payload, time.monotonic(), time.time())
            if verdict is not None and verdict.new_keys:
                self._save_registration()
            if action is APPLY or action is APPLY_ARM_ACK:
                try:
                    self._enforce()
                finally:  # after the data plane: the fsyncs are off the path to the first packet
                    self._save_cache()
                self._report_endpoints(verdict.netmap)
                self._report_routes()
                self._report_exit_node()
            elif action is REVOKED:
                self._publish_status(stream)
                self._save_cache()
                self._enforce()
                return None
            elif action is END:
                return None
            self._publish_status(stream)
        return "stopping"

    # -- registration ------------------------------------------------------------------------
    def _register(self) -> Next | None:
        body = {"node_key": self._node_key(), "hostname": self.config.hostname}
        if self.config.endpoints:
            body["endpoints"] = self.config.endpoints
        if self.config.advertise_routes:
            body["advertised_routes"] = self.config.advertise_routes
        if self.config.auth_key:
            body["auth_key"] = self.config.auth_key
        try:
            resp = self.client.call("POST", REGISTER, body, deadline=5.0)
        except ControlError as e:
            nxt = self.session.registration_refused(e.status, e.code, e.message)
            if nxt is None:
                log.warning("the auth key was refused (%s); keeping the existing registration", e)
                return None
            return self._log_refusal(e, nxt)
        nxt = self.session.registered(resp)
        if "login_url" in resp:
            self._ask_to_sign_in(resp["login_url"])
            return nxt
        log.info("registered with %s", self.client.server)
        if nxt is None and self.session.enforced is None:  # see assign_addresses_soon
            self.wg.assign_addresses_soon(node_addresses(resp["node"]))
        if self.relay is not None:  # the replicas take our relay session from now on
            self.relay.retry_now()
        if nxt is None:
            self._registration_unsaved = True  # saved with the first netmap (_save_cache)
        else:
            self._save_registration()
        return nxt

    def _ask_to_sign_in(self, url: str) -> None:
        """Say once per login where to sign in (as `tailscale up` does); the URL is also in
        `agent status` while the login is in progress."""
        if url != self.login_url_shown:
            self.login_url_shown = url
            print(f"To register this node, sign in at:\n\n\t{url}\n", file=sys.stderr, flush=True)
            self._publish_status(None)

    def _save_registration(self) -> None:
        """registration.json; a node that loses it in a crash registers again with its
        machine key and is answered with the same node."""
        view = self.session.view
        self.state.write_json("registration.json", {"node_id": view.node_id, "pinned": dict(view.pinned)})
        self._registration_unsaved = False

    def _node_key(self) -> str:
        return public_key_of(self._private_key())

    def _private_key(self) -> str:
        return base64.b64encode(bytes(self.state.wireguard_key())).decode()

    def _rotate_wireguard_key(self) -> None:
        """New WireGuard key: announced with a request signed by the machine key, then
        installed; peers learn the new key from their next delta."""
        old = self._node_key()
        new_key = self.state.replace_wireguard_key()
        new_private = base64.b64encode(bytes(new_key)).decode()
        try:
            self.client.call("POST", ROTATE_KEY,
                             {"old_node_key": old, "node_key": public_key_of(new_private)}, deadline=10)
        except (ControlError, OSError) as e:
            log.warning("key rotation failed, keeping the old key: %s", e)
            return
        self.state.commit_wireguard_key()
        self.wg.configure(new_private, self.config.listen_port,
                          self.session.enforced.self_node.addresses if self.session.enforced else ())
        log.info("WireGuard key rotated")

    def _report_endpoints(self, netmap: Netmap | None) -> None:
        """Tell the control plane where peers reach us (local addresses and the STUN-mapped
        one) when that changed (a restart, a NAT rebinding); the change comes back as a delta
        like any other, and peers probe the new candidates."""
        want = self._own_candidates()
        with self._report_lock:
            if netmap is None or not want or tuple(sorted(netmap.self_node.endpoints)) == want:
                return
            if self._reported == want:
                return
            try:
                self.client.call("POST", REPORT, {"endpoints": list(want)}, deadline=5)
                self._reported = want
            except (ControlError, OSError) as e:
                log.info("endpoint report failed (will retry with the next netmap): %s", e)

    def _report_routes(self) -> None:
        """Tell the control plane what this router advertises (this run's flags) and which
        of those subnets it cannot reach now, checked every ROUTE_CHECK_SECONDS."""
        now = time.monotonic()
        if self._routes_reported is not None and now - self._routes_checked < ROUTE_CHECK_SECONDS:
            return
        self._routes_checked = now
        routes = sorted(self.config.advertise_routes)
        nm = self.session.enforced
        serving = nm is not None and set(nm.self_node.allowed_ips) - set(nm.self_node.addresses)
        if not routes and not serving:  # nothing to say (most nodes): no write at all
            return
        want = (routes, unreachable_routes(routes, self.config.interface))
        if want == self._routes_reported:
            return
        try:
            self.client.call("POST", REPORT, {"advertised_routes": want[0],
                                              "unreachable_routes": want[1]}, deadline=5)
            self._routes_reported = want
        except (ControlError, OSError) as e:
            log.info("route report failed (will retry): %s", e)

    def _report_exit_node(self) -> None:
        """Tell the control plane which exit node this agent sends its internet traffic
        through, when that changed: it records it in the node record, and the audit log
        keeps every change (exit-node use is audited)."""
        used = self._exit_node_used
        if used == self._exit_node_reported or self.session.enforced is None:
            return
        try:
            self.client.call("POST", REPORT, {"exit_node": used}, deadline=5)
        except (ControlError, OSError) as e:
            log.info("exit node report failed (will retry): %s", e)
            return
        self._exit_node_reported = used
        self.state.write_json(EXIT_NODE_FILE, {"node": used})

    def _mapped_changed(self, mapped: str) -> None:
        """From the prober's thread: STUN saw our port at a new outside address. Peers
        without a direct path hear it over the relay at once, all of them through the
        control plane."""
        self.mapped = mapped
        self.prober.set_own_candidates(self._own_candidates())
        view = self.view
        self._report_endpoints(view.netmap if view is not None else None)

    def _tell(self, key: bytes, message: bytes) -> None:
        if self.relay is not None:  # None until the relay starts, just after the prober
            self.relay.send(key, message)

    def _own_candidates(self) -> tuple[str, ...]:
        return tuple(sorted({*self.config.endpoints, *([self.mapped] if self.mapped else [])}))

    def _set_stun_servers(self, stream: MapStream) -> None:
        if self.prober is None:  # no data plane (yet): nothing would send them
            return
        servers = [a for a in map(split_endpoint, self.config.stun_servers) if a is not None]
        if stream.stun is not None:
            try:  # the stream's host may be a name; STUN goes to its address
                servers.insert(0, (socket.gethostbyname(stream.stun[0]), stream.stun[1]))
            except OSError as e:
                log.info("no STUN via %s: %s", stream.stun[0], e)
        self.prober.set_stun_servers(servers)

    def _set_peer_endpoint(self, node_key: str, endpoint: str) -> None:
        """From the prober's thread: a probe proved `endpoint`; WireGuard sends there now."""
        try:
            with self._paths_lock:
                if self.wg.set_endpoint(node_key, endpoint, self.config.peer_keepalive):
                    log.info("WireGuard sends to %s at %s", node_key[:8], endpoint)
        except Exception as e:  # the peer may have gone in between
            log.info("cannot set the endpoint of %s: %s", node_key[:8], e)
        self._write_status()

    def _path_for(self, node_key: str) -> str | None:
        """Where WireGuard should send to a peer: its proven direct path, else the relay."""
        return self.prober.direct().get(node_key) or self.relay.endpoint_for(node_key)

    def _with_path(self, peer):
        """The peer as WireGuard should have it: at its path, or without an endpoint until a
        path is known. A first handshake sent to a candidate that does not answer (a peer's
        LAN address across NATs) would hold every later one back for WireGuard's 5 s retry."""
        path = self._path_for(peer.node_key)
        return dataclasses.replace(peer, endpoints=(path,) if path else ())

    def _track_setup(self) -> None:
        """Peers that completed their first handshake since they appeared: how long it took;
        and their keepalive, if they joined after us."""
        if not self._appeared:
            return
        keepalive = self.config.peer_keepalive
        with self._paths_lock:
            dump, now = self.wg.dump(), time.monotonic()
            done = [k for k, s in dump.stats.items() if k in self._appeared and s.latest_handshake]
            self.wg.arm_keepalive([k for k in done if dump.peers[k].keepalive != keepalive], keepalive)
        for key in done:
            self._setup_times.append(round(now - self._appeared.pop(key), 3))

    def _with_paths_report(self, ack: dict) -> dict:
        """An ack with our peers' paths and new setup times (protocol version 2)."""
        nm = self.session.enforced
        peers = len(nm.peers) if nm else 0
        direct = len(self.prober.direct()) if self.prober else 0
        setup, self._setup_times = self._setup_times[:64], self._setup_times[64:]
        return {**ack, "paths": {"direct": min(direct, peers), "relay": max(0, peers - direct)},
                **({"setup": setup} if setup else {})}

    def _path_lost(self, node_key: str) -> None:
        """From the prober's thread: a direct path stopped answering; relay meanwhile."""
        path = self.relay.endpoint_for(node_key)
        if path is not None:
            self._set_peer_endpoint(node_key, path)

    def _retry_unanswered(self, node_key: str) -> None:
        """From the prober's thread: the peer told us over the relay that it knows us now;
        a first initiation of ours that went before is sent again (without a direct path:
        a direct one is proved by the peer's pong, so it knew us)."""
        try:
            with self._paths_lock:
                if node_key not in self.prober.direct() and \
                        self.wg.retry_unanswered(node_key, self.config.peer_keepalive):
                    log.info("first handshake with %s sent again: the peer knows us now", node_key[:8])
        except Exception as e:  # the peer may have gone in between
            log.info("cannot retry the handshake with %s: %s", node_key[:8], e)

    def _reassert_direct(self, key: bytes) -> None:
        """From the relay's thread: packets from the peer came relayed, and WireGuard moves
        a peer to where its last packet came from; a proven direct path is put back."""
        node_key = base64.b64encode(key).decode()
        path = self.prober.direct().get(node_key)
        if path is not None:
            self._set_peer_endpoint(node_key, path)  # nothing is changed if WireGuard stayed

    def _relay_changed(self) -> None:
        """From the relay's thread: the session came up (or moved): peers without a direct
        path go through it, and hear our candidates through it."""
        self.prober.tell_candidates()
        with self._paths_lock:
            nm = self.session.enforced
            direct = self.prober.direct()
            for peer in list(nm.peers.values()) if nm is not None else ():
                if peer.node_key not in direct:
                    path = self.relay.endpoint_for(peer.node_key)
                    if path is not None:
                        self._set_peer_endpoint(peer.node_key, path)

    def _wireguard_keys(self) -> tuple[bytes, bytes]:
        key = self.state.wireguard_key()  # read each time: a key rotation takes effect at once
        return bytes(key), bytes(key.public_key)

    # -- data plane ----------------------------------------------------------------------------
    def _start_dataplane(self) -> None:
        kill_leftover_wireguard(self.state, self.config.interface)
        self.wg = WireGuardInterface(self.config.interface)
        if self.wg.link_exists():
            subprocess.run(["ip", "link", "del", "dev", self.config.interface], check=False)
        self.wg.create()
        if self.wg.pid:
            self.state.write_json(WG_PID_FILE, {"pid": self.wg.pid, "interface": self.config.interface})
        self.fw = PacketFilter(self.config.interface)
        self.fw.apply(())  # deny inbound until a verified netmap says otherwise
        if self.config.advertise_routes:
            self.forwarding = Forwarding(self.config.interface, self.config.advertise_routes,
                                         self.config.masquerade)
            self.forwarding.start()
        if self.config.exit_node:
            self.exit_routing = ExitRouting(self.config.interface, self.config.servers,
                                            self.config.exit_node_allow_lan)
        addresses = self.view.netmap.self_node.addresses if self.view and self.view.netmap else ()
        self.wg.configure(self._private_key(), self.config.listen_port, addresses)
        self._start_dns()

    def _wait_paths_ready(self) -> None:
        """Before a node registers, its prober and relay threads finish their imports
        (aioice, aiohttp: ~0.5-1 s of CPU, begun before wireguard-go started). Peers see the
        node from its registration on and try to reach it: so it can answer their probes and
        relayed handshakes at once, and its first netmap is applied without those imports
        competing for the interpreter; bounded by PATHS_READY_WAIT."""
        deadline = time.monotonic() + PATHS_READY_WAIT
        for name, part in (("prober", self.prober), ("relay", self.relay)):
            if not part.ready.wait(max(0.0, deadline - time.monotonic())):
                log.info("registering before the %s is ready", name)

    def _start_paths(self) -> None:
        """The prober and the relay session, started first: their threads import what they
        need while wireguard-go starts, and neither needs it before a netmap gives them peers."""
        self.prober = PathProber(self.config.listen_port, self._wireguard_keys,
                                 self._set_peer_endpoint, self._mapped_changed, self._path_lost,
                                 self._tell, self._retry_unanswered)
        self.prober.set_own_candidates(self._own_candidates())
        self.prober.start()
        self.relay = RelayClient(self.config.servers, self.machine_key, self.config.listen_port,
                                 self._relay_changed, self.prober.told, self._reassert_direct)
        self.relay.start()

    def _start_dns(self) -> None:
        """MagicDNS on the service address; the host's resolvers are read before anything
        changes them (from the backup, if an earlier run did not restore it)."""
        if self.host_resolver is not None:
            self._host_upstreams = self.host_resolver.upstreams()
        else:
            try:
                with open(self.config.resolv_conf) as f:
                    self._host_upstreams = nameservers(f.read())
            except OSError:
                self._host_upstreams = []
        try:
            self.wg.add_host_address(SERVICE_ADDRESS)
            self.dns = DnsServer()
        except (OSError, WireGuardError) as e:  # e.g. another agent in this namespace has it
            log.warning("MagicDNS not served on %s: %s", SERVICE_ADDRESS, e)
            return
        self.dns.start()

    def _update_dns(self, nm) -> None:
        table = DnsTable.from_netmap(nm, self._host_upstreams)
        if self.dns is not None:
            self.dns.table = table
        if self.host_resolver is None:
            return
        try:
            if table.enabled and self.dns is not None:
                self.host_resolver.point_at_mesh(nm.dns["domain"], nm.dns.get("split", {}))
            elif self.host_resolver.applied is not None:
                self.host_resolver.restore()
        except (OSError, subprocess.CalledProcessError) as e:
            log.warning("host resolver configuration: %s", e)

    def _stop_dataplane(self) -> None:
        self._set_status("stopped")
        if self.host_resolver is not None:
            try:
                self.host_resolver.restore()
            except (OSError, subprocess.CalledProcessError) as e:
                log.warning("restoring the host resolver configuration: %s", e)
        for part in (self.dns, self.relay, self.prober, self.exit_routing, self.forwarding,
                     self.fw, self.wg):
            if part is not None:
                try:
                    part.close()
                except Exception as e:
                    log.warning("teardown of %s: %s", part, e)
        try:
            os.unlink(os.path.join(self.state.path, WG_PID_FILE))
        except FileNotFoundError:
            pass

    def _enforce(self) -> None:
        """Make WireGuard and nftables match the netmap in force now (diffs only)."""
        nm = self.session.enforce_due(time.time(), self.config.max_stale)
        if nm is None:
            return
        old = self.session.enforced
        started = time.monotonic()
        # probes first: they leave by the host's own routes, and an answer found while the
        # rest is configured gives the new peer its direct endpoint in the reconcile below
        new_peers = self.prober.set_peers({p.node_key: p.endpoints for p in nm.peers.values()})
        addresses_at = time.monotonic()
        if old is None or old.self_node.addresses != nm.self_node.addresses:
            self.wg.set_addresses(nm.self_node.addresses)
        now = time.monotonic()
        addresses_ms = (now - addresses_at) * 1e3
        self._appeared = {k: self._appeared.get(k, now) for k in
                          (p.node_key for p in nm.peers.values())
                          if k in self._appeared or old is None or k not in
                          {q.node_key for q in old.peers.values()}}
        wall = time.time()
        self._peer_since = {p.node_key: self._peer_since.get(p.node_key, wall) for p in nm.peers.values()}
        self.relay.retain({p.node_key for p in nm.peers.values()})
        exit_node = find_exit_node(nm.peers.values(), self.config.exit_node)
        self._exit_node_used = exit_node.id if exit_node is not None else None
        # The first netmap's peers go in before its filter: the filter in force then is the
        # start-up one (established replies only), stricter than any netmap's, and WireGuard's
        # handshake overlaps the filter's load. Later filters go first: a narrower one is in
        # force before a peer it excludes is added, and a path proved meanwhile waits for the
        # lock below, not for nft.
        filter_ms = 0.0
        if old is not None and old.packet_filter != nm.packet_filter:
            filter_ms = self._apply_filter(nm)
        with self._paths_lock:
            wireguard_at = time.monotonic()
            self.wg.reconcile([self._with_path(p) for p in wireguard_peers(nm.peers.values(), exit_node)],
                              self.config.peer_keepalive, new_peers_initiate=old is None)
            wireguard_ms = (time.monotonic() - wireguard_at) * 1e3
            if old is None:
                filter_ms = self._apply_filter(nm)
            if self.exit_routing is not None:
                self.exit_routing.use(exit_node)
            self.session.enforced = nm
        self.prober.tell_candidates(new_peers)  # now that WireGuard has them (PathProber.peer_told)
        self._update_dns(nm)
        self._write_status()
        new = [p.name for p in nm.peers.values() if old is None or p.id not in old.peers]
        if new:
            log.info("netmap v%d enforced in %.0f ms (probes %.0f, addresses %.0f, filter %.0f, "
                     "WireGuard %.0f); new peers: %s", nm.version, (time.monotonic() - started) * 1e3,
                     (addresses_at - started) * 1e3, addresses_ms, filter_ms, wireguard_ms,
                     ", ".join(new[:8]))

    def _apply_filter(self, nm) -> float:
        """Load the netmap's packet filter; the milliseconds it took."""
        started = time.monotonic()
        self.fw.apply(nm.packet_filter)
        return (time.monotonic() - started) * 1e3

    def _save_cache(self) -> None:
        if self.view is None or self.view.netmap is None:
            return
        if self._registration_unsaved:  # the cache is only read with it
            self._save_registration()
        self.state.write_json("netmap.json", {"node_id": self.view.node_id,
                                              "netmap": self.view.netmap.to_json(),
                                              "saved_at": time.time()})

    # -- status ------------------------------------------------------------------------------
    def _publish_status(self, stream: MapStream | None = None) -> None:
        """The session's state in status.json, with the stream's replica while connected."""
        s = self.session
        if stream is not None and s.state == "connected":
            self._set_status(s.state, server=stream.server, replica=stream.replica)
        else:
            self._set_status(s.state, error=s.error)

    def _set_status(self, state: str, **fields) -> None:
        new = {"state": state, "server": fields.get("server"), "replica": fields.get("replica"),
               "error": fields.get("error")}
        if {k: self.status.get(k) for k in new} != new:
            self.status.update(new)
            self._write_status()

    def _path_status(self, node_key: str) -> dict | None:
        """How WireGuard reaches the peer: a proven direct endpoint, or the relay's replica."""
        direct = self.prober.direct().get(node_key) if self.prober else None
        if direct:
            return {"kind": "direct", "endpoint": direct}
        relay = self.relay.server if self.relay else None
        return {"kind": "relay", "replica": relay} if relay else None

    def _write_status(self) -> None:
        with self._status_lock:  # the prober's and relay's threads report path changes too
            self._write_status_locked()

    def _write_status_locked(self) -> None:
        nm = self.session.enforced
        self.state.write_json("status.json", {
            **self.status, "pid": os.getpid(), "interface": self.config.interface,
            "node_id": self.view.node_id if self.view else None,
            "version": self.view.version if self.view else None,
            "enforced_version": nm.version if nm else None,
            "addresses": list(nm.self_node.addresses) if nm else [],
            "peers": [{"id": p.id, "name": p.name, "node_key": p.node_key,
                       "allowed_ips": list(p.allowed_ips), "endpoints": list(p.endpoints),
                       "path": self._path_status(p.node_key), "since": self._peer_since.get(p.node_key)}
                      for p in (nm.peers.values() if nm else ())],
            "last_contact": self.session.last_contact,
            "next_expiry": next_expiry(self.view.netmap if self.view else None, time.time()),
            "updated_at": time.time()}, durable=False)


def kill_leftover_wireguard(state: StateDir, interface: str) -> None:
    """A previous agent that was SIGKILLed leaves its wireguard-go child running, holding
    the interface name; end it by the pid we recorded (if it is still that program)."""
    rec = state.read_json(WG_PID_FILE)
    if not rec or rec.get("interface") != interface:
        return
    pid = rec["pid"]
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return
    if any(a.endswith(b"wireguard-go") for a in argv) and interface.encode() in argv:
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.02)


def detect_endpoints(listen_port: int) -> list[str]:
    """Global IPv4 addresses of this host's non-WireGuard interfaces, with our port."""
    try:
        out = subprocess.run(["ip", "-j", "-4", "addr", "show", "scope", "global"],
                             capture_output=True, text=True, timeout=10).stdout
        links = json.loads(out or "[]")
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return []
    found = []
    for link in links:
        for a in link.get("addr_info", []):
            ip = ipaddress.ip_address(a["local"])
            if not ip.is_loopback and ip not in ipaddress.ip_network("100.64.0.0/10"):
                found.append(f"{ip}:{listen_port}")
    return sorted(found)
