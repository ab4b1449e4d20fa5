"""The agent session core (agent/session.py), pure: every decision the daemon, the light
agents and the tests' protocol agent share, driven here with events and times by hand."""
from __future__ import annotations

import random

import pytest

from raftmesh.agent.acks import ACK_DELAY
from raftmesh.agent.netmap_state import AgentNetmap
from raftmesh.agent.session import (APPLY, APPLY_ARM_ACK, BACKOFF_BASE, BACKOFF_CAP, END, IGNORE,
                                    LOGIN_POLL, POLL, REFUSED_RETRY, REVOKED, STOPPED_STATES, VERSION_RETRY, AgentSession,
                                    Next)
from raftmesh.proto.frames import FrameSigner
from raftmesh.proto.routes import BYE_REVOKED, BYE_SHUTTING_DOWN
from raftmesh.proto.version import UNSUPPORTED
from raftmesh.proto.wire import NetmapDelta
from test_agent_netmap import Sender, cluster_key, peer

KEEPALIVE = 10.0
WALL = 1_000_000.0


class HighRng(random.Random):
    """Jitter at its upper bound: the longest waits, so the bounds are checked exactly."""

    def uniform(self, a, b):
        return b


def registered_session(**kw) -> tuple[AgentSession, object]:
    k = cluster_key()
    s = AgentSession(HighRng(), **kw)
    assert s.registration_due
    assert s.registered({"node": {"id": "n1"}, "approved": True,
                         "cluster_keys": [{"id": k.id, "public_key": k.public_key}]}) is None
    return s, k


def streaming(now: float = 0.0, keyed: bool = True):
    """A registered session with an open stream and the replica's sender for it."""
    s, k = registered_session()
    sender = Sender(FrameSigner(k), keyed=keyed)
    s.stream_opened(sender.nonce, sender.agent_keys, KEEPALIVE, now)
    return s, sender


# -- registration -------------------------------------------------------------------------------
def test_registration_pins_the_cluster_keys_and_is_due_once():
    s, k = registered_session()
    assert not s.registration_due and s.view.node_id == "n1" and s.view.pinned == {k.id: k.public_key}
    assert s.since is None


def test_an_auth_key_is_offered_once_and_keeps_what_the_node_holds():
    s, k = registered_session()
    sender = Sender(FrameSigner(k))
    s.stream_opened(sender.nonce, None, KEEPALIVE, 0.0)
    s.frame(sender.full(4, [peer(2)]), 1.0, WALL)
    again = AgentSession(HighRng(), s.view, offer_auth_key=True)
    assert again.registration_due
    k2 = cluster_key()
    assert again.registered({"node": {"id": "n1"}, "approved": True,
                             "cluster_keys": [{"id": k2.id, "public_key": k2.public_key}]}) is None
    assert not again.registration_due and again.since == 4  # same node: netmap and pins kept
    assert again.view.pinned == {k.id: k.public_key, k2.id: k2.public_key}
    other = AgentSession(HighRng(), s.view, offer_auth_key=True)
    other.registered({"node": {"id": "n9"}, "approved": True, "cluster_keys": []})
    assert other.view.node_id == "n9" and other.since is None  # another node: start over


def test_a_pending_node_waits_for_approval():
    s = AgentSession(HighRng())
    nxt = s.registered({"node": {"id": "n1"}, "approved": False, "cluster_keys": []})
    assert nxt == Next(min(REFUSED_RETRY, BACKOFF_BASE + 1.0))
    assert s.state == "pending_approval" and "approve" in s.error


def test_a_login_url_is_shown_and_asked_about_until_the_node_exists():
    s = AgentSession(HighRng())
    url = "https://idp.example.com/authorize?state=x"
    assert s.registered({"login_url": url, "login_expires_at": 1.0}) == Next(LOGIN_POLL)
    assert (s.state, s.error, s.view) == ("login_required", url, None)
    assert s.registration_due and "login_required" in STOPPED_STATES
    assert s.registered({"node": {"id": "n1"}, "approved": True, "cluster_keys": []}) is None
    assert s.view.node_id == "n1"


def test_an_expired_node_registers_again_to_sign_in_again():
    s, sender = streaming()
    s.frame(sender.full(3, [peer(2)]), 1.0, WALL)
    assert not s.registration_due
    s.refused(401, "node_expired", "expired")
    assert s.registration_due
    s.registered({"login_url": "https://idp.example.com/a", "login_expires_at": 1.0})
    assert s.view.node_id and s.registration_due  # the registration is kept meanwhile


def test_a_refused_auth_key_keeps_an_existing_registration_but_not_a_refused_version():
    s, _ = registered_session(offer_auth_key=True)
    s.offer_auth_key = True
    assert s.registration_refused(401, "unauthenticated", "unknown pre-auth key") is None
    assert not s.registration_due
    s.offer_auth_key = True
    nxt = s.registration_refused(426, UNSUPPORTED, "this replica serves agent protocol version 2")
    assert nxt == Next(VERSION_RETRY, rotate=True) and s.state == "unsupported_protocol"
    fresh = AgentSession(HighRng())
    assert fresh.registration_refused(401, "unauthenticated", "unknown pre-auth key") == Next(REFUSED_RETRY)
    assert fresh.state == "refused"
    assert fresh.registration_refused(503, "no_leader", "x").rotate


# -- refusals, failover and backoff --------------------------------------------------------------
def test_failures_move_to_the_next_replica_with_capped_exponential_backoff():
    s, _ = registered_session()
    waits = [s.unreachable("connection refused") for _ in range(8)]
    assert all(n.rotate and not n.revoked for n in waits)
    assert [n.wait for n in waits] == [min(BACKOFF_CAP, BACKOFF_BASE * 2 ** i) for i in range(8)]
    assert s.state == "disconnected" and s.error == "connection refused"
    assert s.refused(503, "not_ready", "behind") == Next(BACKOFF_CAP, rotate=True)  # a 5xx too


def test_backoff_jitter_comes_from_the_injected_rng():
    a, b = AgentSession(random.Random(7)), AgentSession(random.Random(7))
    waits = [a.unreachable("x").wait for _ in range(5)]
    assert waits == [b.unreachable("x").wait for _ in range(5)]
    assert all(0 <= w <= BACKOFF_BASE * 2 ** i for i, w in enumerate(waits))


@pytest.mark.parametrize("status, code, state, revoked", [
    (403, "pending_approval", "pending_approval", False),
    (401, "node_expired", "expired", True),
    (404, "not_found", "deleted", True),
    (400, "bad_request", "refused", False),
])
def test_refusals_wait_in_place_and_drop_peers_when_the_node_is_gone(status, code, state, revoked):
    s, sender = streaming()
    s.frame(sender.full(3, [peer(2)]), 1.0, WALL)
    nxt = s.refused(status, code, "why")
    assert nxt == Next(REFUSED_RETRY, revoked=revoked) and (s.state, s.error) == (state, "why")
    assert bool(s.view.netmap.peers) is not revoked
    assert (state in STOPPED_STATES) is (state != "refused")


def test_a_refused_protocol_version_waits_long_and_tries_another_replica():
    s, _ = registered_session()
    for _ in range(3):  # never a tight loop, however often it is refused
        nxt = s.refused(426, UNSUPPORTED, "serves 2 to 3: upgrade the agent")
        assert nxt == Next(VERSION_RETRY, rotate=True)
    assert s.state == "unsupported_protocol" and "upgrade" in s.error
    assert "unsupported_protocol" in STOPPED_STATES


# -- the stream --------------------------------------------------------------------------------
def test_netmaps_apply_reset_the_backoff_and_set_the_resume_version():
    s, k = registered_session()
    s.unreachable("x")
    s.unreachable("x")
    sender = Sender(FrameSigner(k), keyed=True)
    s.stream_opened(sender.nonce, sender.agent_keys, KEEPALIVE, 0.0)
    action, verdict = s.frame(sender.full(5, [peer(2)]), 1.0, WALL)
    assert action is APPLY_ARM_ACK and verdict.kind == "full" and s.since == 5
    assert (s.state, s.last_contact, s.last_frame) == ("connected", WALL, 1.0)
    delta = NetmapDelta(6, peers_changed=(peer(3),)).to_json()
    action, verdict = s.frame(sender.frame("delta", 6, delta), 1.5, WALL + 0.5)
    assert action is APPLY and set(verdict.netmap.peers) == {"n2", "n3"}  # joins the ack round
    assert s.unreachable("x").wait == BACKOFF_BASE  # reset by the applied netmaps
    assert s.since == 6  # what the next stream resumes from, whichever replica it is


def test_keepalives_and_stale_frames_change_nothing_but_contact():
    s, sender = streaming()
    s.frame(sender.full(5), 1.0, WALL)
    action, verdict = s.frame(sender.frame("keepalive", 5), 9.0, WALL + 8)
    assert action is IGNORE and verdict.kind == "keepalive" and s.last_frame == 9.0
    action, verdict = s.frame(sender.full(4, [peer(7)]), 10.0, WALL + 9)
    assert action is IGNORE and verdict.kind == "stale" and s.since == 5 and not s.view.netmap.peers


def test_a_frame_failing_verification_ends_the_stream_and_fails_over():
    s, sender = streaming()
    s.frame(sender.full(5), 1.0, WALL)
    forged = dict(sender.frame("keepalive", 5), tag="0" * 32)
    action, verdict = s.frame(forged, 2.0, WALL + 1)
    assert (action, verdict) == (END, None) and s.end_reason.startswith("rejected frame: bad stream tag")
    assert s.last_frame == 1.0  # an unverified frame is no contact
    nxt = s.stream_ended("eof")
    assert nxt.rotate and s.state == "disconnected" and "rejected frame" in s.error


def test_a_revoked_bye_drops_every_peer_and_waits_in_place():
    s, sender = streaming()
    s.frame(sender.full(5, [peer(2)]), 1.0, WALL)
    action, verdict = s.frame(sender.frame("bye", 5, {"code": BYE_REVOKED, "message": "node was deleted"}),
                              2.0, WALL + 1)
    assert action is REVOKED and verdict.bye["code"] == BYE_REVOKED
    assert s.view.netmap.peers == {} and s.view.netmap.packet_filter == ()
    assert (s.state, s.error) == ("revoked", "node was deleted")
    assert s.stream_ended("eof") == Next(REFUSED_RETRY)  # no failover: every replica agrees


def test_a_shutting_down_bye_fails_over_and_keeps_the_netmap():
    s, sender = streaming()
    s.frame(sender.full(5, [peer(2)]), 1.0, WALL)
    action, _ = s.frame(sender.frame("bye", 5, {"code": BYE_SHUTTING_DOWN, "message": "bye"}), 2.0, WALL)
    assert action is END and BYE_SHUTTING_DOWN in s.end_reason
    nxt = s.stream_ended(None)
    assert nxt.rotate and not nxt.revoked and set(s.view.netmap.peers) == {"n2"} and s.since == 5


def test_keepalive_silence_of_twice_the_interval_ends_the_stream():
    s, sender = streaming(now=100.0)
    assert not s.silent(100.0 + 2 * KEEPALIVE)
    s.frame(sender.full(5), 110.0, WALL)
    assert not s.silent(110.0 + 2 * KEEPALIVE)
    assert s.silent(110.0 + 2 * KEEPALIVE + 0.01) and "keepalive silence" in s.end_reason
    assert s.stream_ended(None).rotate and "20s" in s.error


def test_a_stream_moved_on_purpose_is_no_failure():
    s, _ = streaming()
    s.unreachable("x")
    assert s.stream_ended("kicked", moved=True) == Next(0.0)
    assert s.unreachable("x").wait == BACKOFF_BASE * 2  # the backoff did not move


# -- acks --------------------------------------------------------------------------------------
def test_an_ack_round_is_due_after_the_jittered_delay_and_covers_the_round():
    s, sender = streaming()
    assert s.poll_timeout(0.0) == POLL and s.take_ack(100.0) is None
    s.frame(sender.full(5), 10.0, WALL)
    s.frame(sender.frame("delta", 6, NetmapDelta(6).to_json()), 10.5, WALL)
    due = 10.0 + ACK_DELAY[1]  # HighRng: the longest delay
    assert s.acks.due_at == due and s.take_ack(due - 0.01) is None
    assert s.poll_timeout(due - 0.5) == 0.5 and s.poll_timeout(due + 5) == 0.01
    assert s.take_ack(due) == {"version": 6, "applied": [[5, ACK_DELAY[1]], [6, ACK_DELAY[1] - 0.5]]}
    assert s.take_ack(due + 1) is None and s.poll_timeout(due) == POLL


def test_acks_of_an_ended_stream_are_dropped():
    s, sender = streaming()
    s.frame(sender.full(5), 10.0, WALL)
    acks = s.acks
    s.stream_ended("eof")
    assert acks.take(100.0) is None and s.take_ack(100.0) is None
    nxt_sender = Sender(sender.signer, keyed=True)
    s.stream_opened(nxt_sender.nonce, nxt_sender.agent_keys, KEEPALIVE, 20.0)
    assert s.acks is not acks and s.state == "connected"
    assert s.view.stream_auth is None  # no tag key until the new stream's first frame
    s.frame(nxt_sender.full(5), 21.0, WALL)
    assert s.view.stream_auth[0] == nxt_sender.nonce


# -- enforcement -----------------------------------------------------------------------------
def test_enforcement_follows_local_key_expiry_and_staleness():
    s, sender = streaming()
    assert s.enforce_due(WALL, 0) is None  # nothing held yet
    s.frame(sender.full(5, [peer(2, expiry=WALL + 60), peer(3)]), 1.0, WALL)
    nm = s.enforce_due(WALL, 0)
    assert set(nm.peers) == {"n2", "n3"}
    s.enforced = nm
    assert s.enforce_due(WALL + 59, 0) is None  # unchanged: nothing to do
    later = s.enforce_due(WALL + 61, 0)  # n2's key expired by local time, no replica needed
    assert set(later.peers) == {"n3"}
    s.enforced = later
    cut = s.enforce_due(WALL + 1000, max_stale=500)  # too long without contact: no peers
    assert cut.peers == {} and cut.packet_filter == ()
