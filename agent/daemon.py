"""The node daemon: register, stream the netmap from any replica, drive WireGuard and nftables.

The data plane must outlive the control plane. The daemon applies the last verified netmap
from its state directory before it talks to any replica, so tunnels come back after a
restart during a full outage; while disconnected it keeps enforcing key expiry by local
time. It fails over between replicas on connection errors, 5xx answers or keepalive silence
longer than twice the interval, with exponential backoff and jitter, and it never stays
"connected" to a stream that has gone quiet.
"""
from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

from raftmesh.proto.frames import FrameError
from raftmesh.proto.routes import BYE_REVOKED, REGISTER, REPORT, ROTATE_KEY
from raftmesh.proto.version import PROTOCOL_VERSION, UNSUPPORTED
from raftmesh.proto.wire import Netmap

from .ack_sender import AckSender
from .acks import ACK_DELAY, PendingAcks
from .control_client import Backoff, ControlClient, ControlError
from .firewall import PacketFilter
from .map_client import MapStream
from .netmap_state import AgentNetmap, effective, next_expiry
from .state_dir import StateDir
from .wireguard import WireGuardInterface, public_key_of

log = logging.getLogger("raftmesh.agent")
DEFAULT_MAX_STALE = 7 * 86400.0
WG_PID_FILE = "wireguard-go.pid"
VERSION_RETRY = 60.0  # after a replica refused our protocol version (another one may serve it)


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
    peer_keepalive: int = 25  # WireGuard persistent keepalive, seconds
    max_stale: float = DEFAULT_MAX_STALE  # stop enforcing a netmap this long without contact

    def __post_init__(self) -> None:
        if not self.hostname:
            self.hostname = os.uname().nodename.split(".")[0][:63] or "node"


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self.state = StateDir(config.state_dir)
        self.machine_key = self.state.machine_key()
        self.client = ControlClient(config.servers, self.machine_key, timeout=10.0)
        self.stop_event = threading.Event()
        self.rotate_event = threading.Event()
        self.registration: dict | None = self.state.read_json("registration.json")
        cached = self.state.read_json("netmap.json")
        self.view: AgentNetmap | None = None
        self.last_contact: float | None = None
        if self.registration and cached and cached.get("node_id") == self.registration["node_id"]:
            self.view = AgentNetmap(self.registration["node_id"], self.registration["pinned"],
                                    Netmap.from_json(cached["netmap"]))
            self.last_contact = cached.get("saved_at")
        elif self.registration:
            self.view = AgentNetmap(self.registration["node_id"], self.registration["pinned"])
        self._checked_auth_key = False  # an --auth-key is offered once per run (re-auth)
        self._reported: tuple[str, ...] | None = None  # endpoints last reported this run
        self.ack_sender = AckSender(self.machine_key)
        self.wg: WireGuardInterface | None = None
        self.fw: PacketFilter | None = None
        self.enforced: Netmap | None = None
        self.status: dict = {"state": "starting", "server": None, "replica": None}
        self.stream: MapStream | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def run(self) -> None:
        self._start_dataplane()
        try:
            self._enforce()  # the cached netmap, before any replica is reachable
            backoff = Backoff(base=0.2, cap=10.0)
            while not self.stop_event.is_set():
                delay = self._session(backoff)
                if delay:
                    self._idle(delay)
        finally:
            self.ack_sender.close()
            self._stop_dataplane()

    def stop(self, *_args) -> None:
        self.stop_event.set()
        stream = self.stream
        if stream is not None:
            stream.close()

    def _idle(self, seconds: float) -> None:
        """Wait (interruptibly) while still enforcing local key expiry."""
        end = time.monotonic() + seconds
        while not self.stop_event.is_set() and time.monotonic() < end:
            self.stop_event.wait(min(1.0, max(0.0, end - time.monotonic())))
            self._enforce()

    # -- one connection attempt ---------------------------------------------------------------
    def _session(self, backoff: Backoff) -> float:
        """Register if needed, stream until it fails; returns how long to wait before retrying."""
        try:
            if not self._ensure_registered():
                return min(5.0, backoff.next_delay() + 1.0)
            since = self.view.version if self.view else None
            self.stream = MapStream(self.client.server, self.machine_key, since,
                                    read_timeout=35.0)
        except ControlError as e:
            return self._refused(e, backoff)
        except (OSError, ValueError) as e:
            log.info("cannot reach %s: %s", self.client.server, e)
            self._set_status("disconnected", error=str(e))
            self.client.rotate()
            return backoff.next_delay()
        stream = self.stream
        try:
            reason = self._consume(stream, backoff)
        finally:
            stream.close()
            self.stream = None
        log.info("stream from %s ended: %s", stream.replica or stream.server, reason)
        if reason == BYE_REVOKED:
            return 5.0
        self.client.rotate()
        return backoff.next_delay()

    def _refused(self, e: ControlError, backoff: Backoff) -> float:
        if e.status >= 500:
            log.info("%s answered %s; trying the next replica", self.client.server, e)
            self._set_status("disconnected", error=str(e))
            self.client.rotate()
            return backoff.next_delay()
        if e.code == UNSUPPORTED:
            log.error("%s does not serve this agent's protocol version %d: %s. Upgrade the agent "
                      "(or the replicas, if the agent is newer); retrying in %gs",
                      self.client.server, PROTOCOL_VERSION, e.message, VERSION_RETRY)
            self._set_status("unsupported_protocol", error=e.message)
            self.client.rotate()
            return VERSION_RETRY
        state = {"pending_approval": "pending_approval", "node_expired": "expired",
                 "not_found": "deleted"}.get(e.code, "refused")
        log.warning("control plane refused this node: %s", e)
        self._set_status(state, error=e.message)
        if state in ("expired", "deleted"):
            self._revoke_locally()
        return 5.0

    def _consume(self, stream: MapStream, backoff: Backoff) -> str:
        watchdog = 2 * stream.keepalive
        self.view.begin_stream(stream.nonce, stream.stream_keys)
        last_frame = time.monotonic()
        acks = PendingAcks()
        self._set_status("connected", server=stream.server, replica=stream.replica)
        while not self.stop_event.is_set():
            if self.rotate_event.is_set():
                self.rotate_event.clear()
                self._rotate_wireguard_key()
            now = time.monotonic()
            if acks.due(now):
                self.ack_sender.send(stream.server, acks.take(now), self.view.stream_auth)
            wait = 1.0 if acks.due_at is None else min(1.0, max(0.01, acks.due_at - now))
            item = stream.next(timeout=wait)
            if item is None:
                if time.monotonic() - last_frame > watchdog:
                    return f"no frame for {watchdog:g}s (keepalive silence)"
                self._enforce()
                continue
            kind, payload = item
            if kind != "frame":
                return f"{kind}: {payload}"
            try:
                verdict = self.view.accept(payload)
            except FrameError as e:
                return f"rejected frame: {e}"  # a replica or proxy we cannot trust: go elsewhere
            last_frame = time.monotonic()
            self.last_contact = time.time()
            if verdict.new_keys:
                self.registration["pinned"] = dict(self.view.pinned)
                self.state.write_json("registration.json", self.registration)
            if verdict.kind == "bye":
                code = (verdict.bye or {}).get("code")
                if code == BYE_REVOKED:
                    self._set_status("revoked", error=(verdict.bye or {}).get("message"))
                    self._revoke_locally()
                    return BYE_REVOKED
                return f"bye: {verdict.bye}"
            if verdict.netmap is not None:
                backoff.reset()
                self._save_cache()
                self._enforce()
                acks.add(verdict.version, time.monotonic(), random.uniform(*ACK_DELAY))
                self._report_endpoints(verdict.netmap)
            self._set_status("connected", server=stream.server, replica=stream.replica)
        return "stopping"

    # -- registration ------------------------------------------------------------------------
    def _ensure_registered(self) -> bool:
        reg = self.registration
        if reg is not None and (self._checked_auth_key or not self.config.auth_key):
            return True
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
            if reg is None or e.status >= 500 or e.code == UNSUPPORTED:
                raise
            log.warning("the auth key was refused (%s); keeping the existing registration", e)
            self._checked_auth_key = True
            return True
        self._checked_auth_key = True
        pinned = {k["id"]: k["public_key"] for k in resp["cluster_keys"]}
        if reg is not None:
            pinned = {**reg["pinned"], **pinned} if reg["node_id"] == resp["node"]["id"] else pinned
        self.registration = {"node_id": resp["node"]["id"], "pinned": pinned}
        self.state.write_json("registration.json", self.registration)
        if self.view is None or self.view.node_id != resp["node"]["id"]:
            self.view = AgentNetmap(resp["node"]["id"], pinned)
        else:
            self.view.pinned.update(pinned)
        if not resp["approved"]:
            self._set_status("pending_approval", error="waiting for an admin to approve this node")
            return False
        return True

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
                          self.enforced.self_node.addresses if self.enforced else ())
        log.info("WireGuard key rotated")

    def _report_endpoints(self, netmap: Netmap) -> None:
        """Tell the control plane where peers reach us when that changed (e.g. a restart
        with other addresses); the change comes back as a delta like any other."""
        want = tuple(sorted(self.config.endpoints))
        if not want or tuple(sorted(netmap.self_node.endpoints)) == want:
            return
        if self._reported == want:
            return
        try:
            self.client.call("POST", REPORT, {"endpoints": list(want)}, deadline=5)
            self._reported = want
        except (ControlError, OSError) as e:
            log.info("endpoint report failed (will retry with the next netmap): %s", e)

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
        addresses = self.view.netmap.self_node.addresses if self.view and self.view.netmap else ()
        self.wg.configure(self._private_key(), self.config.listen_port, addresses)

    def _stop_dataplane(self) -> None:
        self._set_status("stopped")
        for part in (self.fw, self.wg):
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
        nm = effective(self.view.netmap if self.view else None, time.time(), self.last_contact,
                       self.config.max_stale)
        if nm is None or nm == self.enforced:
            return
        old = self.enforced
        if old is None or old.self_node.addresses != nm.self_node.addresses:
            self.wg.set_addresses(nm.self_node.addresses)
        self.wg.reconcile(list(nm.peers.values()), self.config.peer_keepalive)
        if old is None or old.packet_filter != nm.packet_filter:
            self.fw.apply(nm.packet_filter)
        self.enforced = nm
        self._write_status()

    def _revoke_locally(self) -> None:
        """This node was revoked or expired: no peers, deny everything, forget the cache."""
        if self.view is not None and self.view.netmap is not None:
            me = self.view.netmap.self_node
            self.view.netmap = Netmap(self.view.netmap.version, me, {}, ())
            self._save_cache()
        self._enforce()

    def _save_cache(self) -> None:
        self.state.write_json("netmap.json", {"node_id": self.view.node_id,
                                              "netmap": self.view.netmap.to_json(),
                                              "saved_at": time.time()})

    # -- status ------------------------------------------------------------------------------
    def _set_status(self, state: str, **fields) -> None:
        new = {"state": state, "server": fields.get("server"), "replica": fields.get("replica"),
               "error": fields.get("error")}
        if {k: self.status.get(k) for k in new} != new:
            self.status.update(new)
            self._write_status()

    def _write_status(self) -> None:
        nm = self.enforced
        self.state.write_json("status.json", {
            **self.status, "pid": os.getpid(), "interface": self.config.interface,
            "node_id": self.view.node_id if self.view else None,
            "version": self.view.version if self.view else None,
            "enforced_version": nm.version if nm else None,
            "addresses": list(nm.self_node.addresses) if nm else [],
            "peers": [{"id": p.id, "name": p.name, "node_key": p.node_key,
                       "allowed_ips": list(p.allowed_ips), "endpoints": list(p.endpoints)}
                      for p in (nm.peers.values() if nm else ())],
            "last_contact": self.last_contact,
            "next_expiry": next_expiry(self.view.netmap if self.view else None, time.time()),
            "updated_at": time.time()})


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
