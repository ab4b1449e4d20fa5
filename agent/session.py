"""One agent session's decisions without I/O, in the style of h11: events in, actions out.

The daemon (threads, urllib), the benchmarks' light agents (asyncio, thousands per process)
and the tests' protocol agent all drive this one core, so they register, stream, fail over,
resume, ack and revoke alike. A driver does the I/O and reports what happened, with the time
(`now`: a monotonic clock; `wall`: the time of day); the core answers what to do next. No
sockets, threads or clock reads here; randomness only from the RNG the driver injects
(backoff and ack jitter), so every decision is unit-tested (tests/test_agent_session.py).

A frame costs one AgentNetmap.accept (the verification) and no allocation but the
(action, verdict) pair it returns: the benchmarks run 10,000 light agents on two cores.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from raftmesh.proto.frames import FrameError
from raftmesh.proto.routes import BYE_REVOKED
from raftmesh.proto.version import UNSUPPORTED
from raftmesh.proto.wire import Netmap

from .acks import ACK_DELAY, PendingAcks
from .netmap_state import AgentNetmap, Verdict, effective

BACKOFF_BASE = 0.2  # seconds, doubling per failed attempt, full jitter
BACKOFF_CAP = 10.0
SILENCE_KEEPALIVES = 2  # a stream without a frame for this many keepalive periods is dead
REFUSED_RETRY = 5.0  # pending approval, expired, deleted, revoked: ask again this often
VERSION_RETRY = 60.0  # after a replica refused our protocol version (another may serve it)
LOGIN_POLL = 2.0  # while the person signs in at the identity provider: ask whether it is done
POLL = 1.0  # the longest a driver waits for a frame before asking the core again

# What a frame asks of the driver (AgentSession.frame).
IGNORE = "ignore"  # a keepalive or a stale frame: nothing to do
APPLY = "apply"  # a newer netmap: enforce it (the daemon saves it first)
APPLY_ARM_ACK = "apply_arm_ack"  # the same, and an ack round began: take_ack at acks.due_at
END = "end"  # close the stream (end_reason says why); then stream_ended()
REVOKED = "revoked"  # the node was revoked: its netmap has no peers now; then stream_ended()

# States, as `agent status` shows them, for refusals by code.
_REFUSAL_STATES = {"pending_approval": "pending_approval", "node_expired": "expired",
                   "not_found": "deleted", UNSUPPORTED: "unsupported_protocol"}
# States only an operator ends (approve, re-authenticate, upgrade): the daemon keeps asking
# every REFUSED_RETRY (or VERSION_RETRY) seconds, a benchmark's light agent stops.
STOPPED_STATES = ("pending_approval", "expired", "deleted", "unsupported_protocol", "revoked",
                  "login_required")
# States in which registering again may end them: single sign-on re-authenticates an expired
# node, and tells a login in progress from a finished one.
_REGISTER_AGAIN = ("expired", "login_required")


class Backoff:
    """Exponential backoff with full jitter, capped; reset after a success."""

    __slots__ = ("base", "cap", "attempt", "rng")

    def __init__(self, rng: random.Random, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP):
        self.base, self.cap, self.attempt, self.rng = base, cap, 0, rng

    def next_delay(self) -> float:
        delay = self.rng.uniform(0, min(self.cap, self.base * (2 ** self.attempt)))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


@dataclass(frozen=True)
class Next:
    """What to do after a registration, a refusal or the end of a stream."""

    wait: float  # seconds before the next attempt
    rotate: bool = False  # move to the next replica URL first
    revoked: bool = False  # the netmap lost its peers: enforce (and save) it now


class AgentSession:
    """The session state of one agent. `view` is the AgentNetmap of its registration, if
    it has one; `offer_auth_key`: an auth key is to be offered once (re-authenticates an
    expired node)."""

    __slots__ = ("rng", "view", "offer_auth_key", "backoff", "state", "error",
                 "acks", "silence", "last_frame", "last_contact", "end_reason", "enforced")

    def __init__(self, rng: random.Random, view: AgentNetmap | None = None,
                 offer_auth_key: bool = False, backoff_base: float = BACKOFF_BASE,
                 last_contact: float | None = None):
        self.rng, self.view, self.offer_auth_key = rng, view, offer_auth_key
        self.backoff = Backoff(rng, backoff_base)  # reset by an applied netmap
        self.state, self.error = "starting", None
        self.acks = PendingAcks()  # of the open stream: its replica alone can use them
        self.silence = 0.0  # the open stream's longest allowed gap between frames
        self.last_frame = 0.0  # monotonic time of the last verified frame
        self.last_contact = last_contact  # wall time of the last verified frame
        self.end_reason: str | None = None  # why the stream ended (or must end)
        self.enforced: Netmap | None = None  # what the driver enforces now (enforce_due)

    @property
    def since(self) -> int | None:
        """The version to resume a stream from: the one held, whichever replica sent it."""
        return self.view.version if self.view is not None else None

    # -- registration ------------------------------------------------------------------------
    @property
    def registration_due(self) -> bool:
        return self.view is None or self.offer_auth_key or self.state in _REGISTER_AGAIN

    def registered(self, resp: dict) -> Next | None:
        """A register answer: pin the cluster keys it lists (on top of the held ones for the
        same node). None: stream now; a Next while the node waits for approval, or for the
        person to sign in at the URL in `error` (single sign-on)."""
        self.offer_auth_key = False
        if "login_url" in resp:
            self._set("login_required", resp["login_url"])
            return Next(LOGIN_POLL)
        node_id = resp["node"]["id"]
        pinned = {k["id"]: k["public_key"] for k in resp["cluster_keys"]}
        if self.view is None or self.view.node_id != node_id:
            self.view = AgentNetmap(node_id, pinned)
        else:
            self.view.pinned.update(pinned)
        if resp["approved"]:
            return None
        self._set("pending_approval", "waiting for an admin to approve this node")
        return Next(min(REFUSED_RETRY, self.backoff.next_delay() + 1.0))

    def registration_refused(self, status: int, code: str, message: str) -> Next | None:
        """A registration refused. A node already registered keeps its registration when
        only the offered auth key was refused (None: stream now)."""
        if self.view is None or status >= 500 or code == UNSUPPORTED:
            return self.refused(status, code, message)
        self.offer_auth_key = False
        return None

    # -- refusals and failures -----------------------------------------------------------------
    def refused(self, status: int, code: str, message: str) -> Next:
        """An error answer to a register or map request."""
        if status >= 500:  # this replica cannot serve now; another may
            return self.unreachable(f"{status} {code}: {message}")
        state = _REFUSAL_STATES.get(code, "refused")
        self._set(state, message)
        if state == "unsupported_protocol":
            return Next(VERSION_RETRY, rotate=True)
        revoked = state in ("expired", "deleted") and self._drop_peers()
        return Next(REFUSED_RETRY, revoked=revoked)

    def unreachable(self, error: str) -> Next:
        """No answer (connection error, timeout) or a 5xx: the next replica, after backoff."""
        self._set("disconnected", error)
        return Next(self.backoff.next_delay(), rotate=True)

    # -- the stream ------------------------------------------------------------------------------
    def stream_opened(self, nonce: str, stream_keys: tuple[bytes, bytes] | None,
                      keepalive: float, now: float) -> None:
        """A map request answered 200 with a stream: accept its frames only (begin_stream)."""
        self.view.begin_stream(nonce, stream_keys)
        self.acks = PendingAcks()
        self.silence = SILENCE_KEEPALIVES * keepalive
        self.last_frame, self.end_reason = now, None
        self._set("connected", None)

    def frame(self, frame: dict, now: float, wall: float) -> tuple[str, Verdict | None]:
        """One decoded frame: (action, its verdict; None if it failed verification)."""
        try:
            verdict = self.view.accept(frame)
        except FrameError as e:  # a replica or proxy we cannot trust: go elsewhere
            self.end_reason = f"rejected frame: {e}"
            return END, None
        self.last_frame, self.last_contact = now, wall
        if verdict.netmap is not None:
            self.backoff.reset()
            acks = self.acks
            arm = acks.due_at is None
            acks.add(verdict.version, now, self.rng.uniform(*ACK_DELAY))
            return (APPLY_ARM_ACK if arm else APPLY), verdict
        if verdict.kind != "bye":
            return IGNORE, verdict
        bye = verdict.bye or {}
        if bye.get("code") == BYE_REVOKED:
            self._set("revoked", bye.get("message"))
            self.end_reason = BYE_REVOKED
            self._drop_peers()
            return REVOKED, verdict
        self.end_reason = f"bye: {verdict.bye}"  # e.g. shutting_down: fail over
        return END, verdict

    def silent(self, now: float) -> bool:
        """True (and end_reason set) once the stream went without a frame too long."""
        if now - self.last_frame <= self.silence:
            return False
        self.end_reason = f"no frame for {self.silence:g}s (keepalive silence)"
        return True

    def poll_timeout(self, now: float) -> float:
        """How long a driver may wait for the next frame: until the ack is due, at most POLL."""
        due = self.acks.due_at
        return POLL if due is None else min(POLL, max(0.01, due - now))

    def take_ack(self, now: float) -> dict | None:
        """The ack body if one is due (to the stream's replica, with view.stream_auth)."""
        return self.acks.take(now) if self.acks.due(now) else None

    def stream_ended(self, reason: str | None = None, moved: bool = False) -> Next:
        """The stream is closed (after END or REVOKED, or EOF, an error, silence: `reason`).
        `moved`: the driver closed it to connect elsewhere on purpose (no failure)."""
        self.acks.clear()  # its replica alone could match them to the frames it sent
        if self.end_reason is None:
            self.end_reason = reason
        if self.state == "revoked":
            return Next(REFUSED_RETRY)
        if moved:
            return Next(0.0)
        return self.unreachable(self.end_reason or "stream ended")

    # -- enforcement ----------------------------------------------------------------------------
    def enforce_due(self, wall: float, max_stale: float) -> Netmap | None:
        """The netmap to enforce now if it differs from the enforced one: key expiry by local
        time and `max_stale` without contact apply even with no replica reachable."""
        nm = effective(self.view.netmap if self.view else None, wall, self.last_contact, max_stale)
        if nm is None or nm == self.enforced:
            return None
        return nm

    # -- internals ---------------------------------------------------------------------------------
    def _drop_peers(self) -> bool:
        """Revoked or expired: keep only ourselves, deny everything (True if a netmap changed)."""
        nm = self.view.netmap if self.view is not None else None
        if nm is None:
            return False
        self.view.netmap = Netmap(nm.version, nm.self_node, {}, ())
        return True

    def _set(self, state: str, error: str | None) -> None:
        self.state, self.error = state, error
