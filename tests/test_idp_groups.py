"""Identity-provider groups in the policy (`group:idp/<name>`): resolved per node from the
replicated membership its record carries, so a membership change is a node change."""
from __future__ import annotations

import json

import pytest

from raftmesh.cluster import commands as c
from raftmesh.cluster import state_machine as sm
from raftmesh.cluster.netmap import NetmapIndex
from raftmesh.cluster.policy import PolicyError, parse_policy
from raftmesh.cluster.policy_form import compile_policy, read_form
from test_netmap import NOW, acl, maps, node, peers, policy
from test_state_machine import DictTxn

ENG_TO_DB = [acl(["group:idp/Engineering"], ["tag:db:5432"])]


def test_an_idp_group_selects_the_devices_of_its_members_only():
    pol = policy(ENG_TO_DB)
    nodes = [node(1, "alice", idp_groups=["engineering"]), node(2, tags=["tag:db"]),
             node(3, "bob", idp_groups=["sales"]),
             node(4, tags=["tag:db"], registered_by="carol", idp_groups=["engineering"])]
    nms = maps(pol, nodes)
    assert peers(nms["n1"]) == {"n2", "n4"} and peers(nms["n3"]) == set()
    assert peers(nms["n2"]) == {"n1"}  # a tagged node is no member, whatever its registrant's groups
    assert maps(read_form(json.loads(json.dumps(compile_policy(pol)))), nodes) == nms


def test_a_membership_change_reaches_exactly_the_affected_netmaps():
    pol = policy(ENG_TO_DB)
    nodes = [node(1, "alice", idp_groups=["engineering"]), node(2, tags=["tag:db"]),
             node(3, "bob"), node(5, "dave")]
    idx = NetmapIndex(pol, nodes, NOW)
    deltas, gone = idx.upsert_node(dict(nodes[2], idp_groups=["engineering"]), 2)
    assert set(deltas) == {"n3", "n2"} and gone == ()
    assert set(idx.netmap("n3", 2).peers) == {"n2"}
    deltas, _ = idx.upsert_node(nodes[2], 3)
    assert set(deltas) == {"n3", "n2"} and deltas["n2"].peers_removed == ("n3",)


@pytest.mark.parametrize("selector", ["group:idp/", "group:idp/two words", "group:idpx"])
def test_malformed_idp_group_names_are_refused(selector):
    with pytest.raises(PolicyError) as e:
        parse_policy(json.dumps({"acls": [acl([selector], ["*:*"])]}))
    assert selector in str(e.value)


def _apply(txn, cmd, version):
    result = sm.apply(txn, cmd, version)
    assert result["ok"], result
    return result["value"]


def test_scim_group_membership_is_carried_by_the_members_nodes():
    txn = DictTxn()
    users = {}
    for i, name in enumerate(("alice", "bob")):
        users[name] = _apply(txn, c.ScimPut(resource_type="User", id=f"u{i}", create=True, resource={
            "id": f"u{i}", "userName": name, "meta": {"resourceType": "User", "version": "1"}}), i + 1)
        _apply(txn, c.NodeRegister(id=f"n{i}", name=name, machine_key=f"m{i}", node_key=f"k{i}",
                                   user=name), 10 + i)
    group = {"id": "g1", "displayName": "Engineering", "members": [{"value": "u0"}],
             "meta": {"resourceType": "Group", "version": "1"}}
    changed = _apply(txn, c.ScimPut(resource_type="Group", id="g1", create=True, resource=group), 20)
    assert [(n["id"], n["idp_groups"]) for n in changed["nodes"]] == [("n0", ["engineering"])]
    group = dict(group, members=[{"value": "u1"}])
    changed = _apply(txn, c.ScimPut(resource_type="Group", id="g1", create=False, resource=group), 21)
    assert sorted((n["id"], n["idp_groups"]) for n in changed["nodes"]) == [
        ("n0", []), ("n1", ["engineering"])]
    _apply(txn, c.NodeRegister(id="n2", name="bob2", machine_key="m2", node_key="k2", user="bob"), 22)
    assert txn.get("nodes", "n2")["idp_groups"] == ["engineering"]  # a new device of a member
    changed = _apply(txn, c.ScimDelete(resource_type="Group", id="g1"), 23)
    assert sorted(n["id"] for n in changed["nodes"]) == ["n1", "n2"]
    assert all(not txn.get("nodes", n)["idp_groups"] for n in ("n0", "n1", "n2"))
