"""What the API answers when Raft does not apply a write or cannot confirm a read, each case
forced deterministically on the in-memory Raft (test_cluster shows them on a real minority,
where which one happens depends on timing)."""
from __future__ import annotations

import time

import pytest

from raftmesh.cluster.raft import Outcome

from in_memory_api import ServedInMemory
from test_api_bad_input import Api, assert_error


@pytest.fixture
def api(tmp_path):
    with ServedInMemory(str(tmp_path)) as served:
        yield Api(served)


def user_names(api) -> list[str]:
    return [u["name"] for u in api("GET", "/api/v1/users").body["users"]]


def test_a_write_not_applied_is_503_no_leader_and_may_be_retried(api):
    api.cluster.raft.script_outcomes(Outcome(Outcome.NOT_APPLIED, reason="not_leader"))
    err = assert_error(api("POST", "/api/v1/users", {"name": "lost"}), 503, "no_leader")
    assert "not applied" in err["message"] and "not_leader" in err["message"]
    assert "lost" not in user_names(api)
    assert api("POST", "/api/v1/users", {"name": "lost"}).status == 201


def test_a_write_of_unknown_outcome_is_503_outcome_unknown(api):
    api.cluster.raft.script_outcomes(Outcome(Outcome.UNKNOWN, reason="leader_changed"))
    err = assert_error(api("POST", "/api/v1/users", {"name": "unsure"}), 503, "outcome_unknown")
    assert "may or may not" in err["message"]


@pytest.mark.parametrize("kind", [Outcome.NOT_APPLIED, Outcome.UNKNOWN])
def test_a_read_without_a_barrier_is_503_not_ready_unless_stale(api, kind):
    assert api("POST", "/api/v1/users", {"name": "known"}).status == 201
    api.cluster.raft.script_outcomes(Outcome(kind, reason="no_quorum"))
    err = assert_error(api("GET", "/api/v1/users"), 503, "not_ready")
    assert "stale=true" in err["message"]
    api.cluster.raft.script_outcomes(Outcome(kind, reason="no_quorum"))
    stale = api("GET", "/api/v1/users?stale=true")
    assert stale.status == 200 and stale.body["stale"] is True
    assert [u["name"] for u in stale.body["users"]] == ["known"]


def test_a_membership_change_refused_while_another_is_uncommitted_says_so_and_records_nothing(api):
    """The leader refuses both a change that changes nothing and one made while another is
    uncommitted; a client must tell them apart to know whether to retry."""
    new = {"id": "r9", "raft_addr": "127.0.0.1:9", "api_url": "http://127.0.0.1:9"}
    api.cluster.raft.script_outcomes(Outcome(Outcome.NOT_APPLIED, reason="request_denied"))
    err = assert_error(api("POST", "/api/v1/cluster/members", new), 409, "membership_change_in_progress")
    assert "retry" in err["message"]
    assert "r9" not in [m["id"] for m in api("GET", "/api/v1/cluster/members").body["members"]]
    assert api("POST", "/api/v1/cluster/members", new).status == 201
    assert_error(api("POST", "/api/v1/cluster/members", new), 409, "already_member")


def test_a_whole_number_written_as_a_float_is_an_integer(api):
    """JSON Schema counts 5.0 as an integer; the command once refused it: a 500 (schemathesis)."""
    assert api("POST", "/api/v1/users", {"name": "owner"}).status == 201
    created = api("POST", "/api/v1/preauth-keys", {"user": "owner", "reusable": True, "usage_limit": 61724.0})
    assert created.status == 201, created.body
    assert created.body["preauth_key"]["usage_limit"] == 61724
    err = assert_error(api("POST", "/api/v1/preauth-keys", {"user": "owner", "reusable": True,
                                                           "usage_limit": 2.5}), 400, "validation_failed")
    assert "usage_limit" in err["message"]


def test_a_stale_read_states_its_staleness_and_max_staleness_bounds_it(api):
    assert api("POST", "/api/v1/users", {"name": "known"}).status == 201
    fresh = api("GET", "/api/v1/users?stale=true&max_staleness=0")
    assert fresh.status == 200 and fresh.headers["Raftmesh-Staleness"] == "leader-contact-ms=0; unapplied=0"
    assert "Raftmesh-Staleness" not in api("GET", "/api/v1/users").headers  # linearizable
    err = assert_error(api("GET", "/api/v1/users?max_staleness=1"), 400, "bad_request")
    assert "stale=true" in err["message"]
    assert_error(api("GET", "/api/v1/users?stale=true&max_staleness=-1"), 400, "bad_request")
    raft = api.cluster.raft  # now a follower that last heard its leader 5 s ago, 2 entries behind
    raft.status = dict(raft.status, state="follower", leader_heard=time.monotonic() - 5,
                       leader_commit_index=raft.status["applied_index"] + 2)
    err = assert_error(api("GET", "/api/v1/users?stale=true&max_staleness=10"), 503, "not_ready")
    assert "2 committed entries not applied" in err["message"]
    raft.status = dict(raft.status, leader_commit_index=raft.status["applied_index"])
    err = assert_error(api("GET", "/api/v1/users?stale=true&max_staleness=1"), 503, "not_ready")
    assert "leader last heard 5" in err["message"]
    old = api("GET", "/api/v1/users?stale=true&max_staleness=10")
    assert old.status == 200 and [u["name"] for u in old.body["users"]] == ["known"]
    contact = int(old.headers["Raftmesh-Staleness"].split(";")[0].split("=")[1])
    assert 5000 <= contact < 15000
    raft.status = dict(raft.status, leader=None)
    assert api("GET", "/api/v1/users?stale=true").headers["Raftmesh-Staleness"].startswith(
        "leader-contact-ms=unknown")
    assert_error(api("GET", "/api/v1/users?stale=true&max_staleness=3600"), 503, "not_ready")
