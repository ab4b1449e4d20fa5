"""The compiled policy: what the API proposes with the text and every replica derives
netmaps from, the same whatever parser each replica's raftmesh version has."""
from __future__ import annotations

import json

import pytest

from raftmesh.cluster.netmap import compute_netmaps
from raftmesh.cluster.policy import parse_policy
from raftmesh.cluster.policy_form import (POLICY_FORMAT, UnreadablePolicy, compile_policy,
                                          read_form, stored_policy)

from test_netmap import ACL_POOL, NOW, node, policy

NODES = [node(1, "alice"), node(2, "bob"), node(3, tags=("tag:web",)), node(4, tags=("tag:db",)),
         node(5, "carol", approved_routes=["10.1.0.0/24"]), node(6, "dave")]


def over_the_wire(form: dict) -> dict:
    return json.loads(json.dumps(form))


def test_a_compiled_policy_reads_back_as_the_parsed_one_with_the_same_netmaps():
    parsed = policy(ACL_POOL)
    form = over_the_wire(compile_policy(parsed))
    assert form["format"] == POLICY_FORMAT
    read = read_form(form)
    assert (read.acls, read.groups, read.tag_owners, read.hosts) == \
        (parsed.acls, parsed.groups, parsed.tag_owners, parsed.hosts)
    assert compute_netmaps(read, NODES, NOW, 1) == compute_netmaps(parsed, NODES, NOW, 1)


def test_the_form_is_resolved_so_reading_it_involves_no_policy_decisions():
    form = compile_policy(policy([{"action": "accept", "src": ["group:eng", "printer"],
                                   "dst": ["tag:db:80,443,1000-2000"]}]))
    assert form["selectors"] == [["group:eng", "users", ["alice", "bob"]],
                                 ["printer", "prefix", "10.1.0.9/32"], ["tag:db", "tag", "tag:db"]]
    assert form["acls"] == [[[0, 1], [[2, [[80, 80], [443, 443], [1000, 2000]]]], []]]


def test_entries_from_before_the_compiled_form_are_parsed_from_their_text():
    text = json.dumps({"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"]}]})
    assert stored_policy({"text": text}).acls == parse_policy(text).acls
    with pytest.raises(UnreadablePolicy, match="its text no longer parses"):
        stored_policy({"text": "{"})


@pytest.mark.parametrize("form, reason", [
    ({"format": 3, "acls": []}, "format 3; this raftmesh reads formats 1 and 2"),
    ({"acls": []}, "no format number"),
    ([], "no format number"),
    ({"format": 1}, "malformed (KeyError"),
    ({"format": 1, "groups": {}, "tagOwners": {}, "hosts": {},
      "selectors": [["x", "wildcard", None]], "acls": []}, "bad selector"),
    ({"format": 1, "groups": {}, "tagOwners": {}, "hosts": {},
      "selectors": [["*", "any", None]], "acls": [[[0], [[0, [[5, 1]]]], []]]}, "bad port range"),
    ({"format": 1, "groups": {}, "tagOwners": {}, "hosts": {},
      "selectors": [["*", "any", None]], "acls": [[[1], [], []]]}, "IndexError"),
    ({"format": 1, "groups": {}, "tagOwners": {}, "hosts": {"h": "10.0.0.1/8"},
      "selectors": [], "acls": []}, "host bits set"),
])
def test_a_form_it_cannot_interpret_is_an_error_never_another_policy(form, reason):
    with pytest.raises(UnreadablePolicy, match=reason.replace("(", r"\(")):
        stored_policy({"text": "{}", "compiled": form})
