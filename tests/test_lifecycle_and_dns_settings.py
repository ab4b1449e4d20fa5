"""DNS settings and node lifecycle in the state machine and the netmap feed (pure)."""
import pytest

from raftmesh.cluster import dns_config, lifecycle
from raftmesh.cluster.netmap_feed import NetmapFeed
from raftmesh.cluster.policy import parse_policy
from raftmesh.cluster.policy_form import compile_policy
from raftmesh.proto.wire import Netmap, apply_delta

from test_state_machine import DictTxn, cmd, run

ALLOW_ALL = '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}'


def setup(ephemeral: bool = True):
    return [
        cmd("user.create", name="alice"),
        cmd("preauthkey.create", id="k1", user="alice", hash="h", reusable=True,
            ephemeral=ephemeral, tags=[]),
        cmd("node.register", id="n1", name="web", machine_key="m1", node_key="nk1",
            preauth_key_id="k1", key_expiry=500.0),
        cmd("node.register", id="n2", name="db", machine_key="m2", node_key="nk2",
            preauth_key_id="k1"),
    ]


def audit_actions(txn) -> list[tuple[str, str]]:
    return [(e["action"], e["target"]) for _, e in txn.items("audit")]


# -- DNS settings -----------------------------------------------------------------------------
def test_settings_are_normalised_and_left_out_fields_take_the_default():
    got = dns_config.validated({"domain": "Corp.Example.", "split": {"Lab.example": ["10.0.0.53"]},
                                "nameservers": ["1.1.1.1", "2606:4700::1111"]})
    assert got == {"magic_dns": True, "domain": "corp.example",
                   "nameservers": ["1.1.1.1", "2606:4700::1111"],
                   "split": {"lab.example": ["10.0.0.53"]}}
    assert dns_config.validated({}) == dns_config.default_settings()


@pytest.mark.parametrize("settings, words", [
    ({"domain": "bad_name.example"}, "domain 'bad_name.example' is not a DNS name"),
    ({"domain": "a" * 64 + ".x"}, "is not a DNS name"),
    ({"nameservers": ["1.1.1.1", "dns.google"]}, "nameservers: 'dns.google' is not an IP"),
    ({"nameservers": ["1.1.1.1", "1.1.1.1"]}, "twice"),
    ({"split": {"lab.example": []}}, "needs at least one resolver"),
    ({"split": {"Lab.example": ["10.0.0.1"], "lab.example.": ["10.0.0.2"]}}, "given twice"),
    ({"magic_dns": "yes"}, "magic_dns must be true or false"),
    ({"search": ["x"]}, "unknown DNS settings ['search']"),
])
def test_bad_settings_are_refused_naming_the_problem(settings, words):
    with pytest.raises(dns_config.DnsSettingsError, match=words.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(")):
        dns_config.validated(settings)


def test_dns_set_is_stored_audited_and_refused_when_invalid():
    txn = DictTxn()
    good = dns_config.validated({"domain": "corp.example"})
    r_ok, r_bad, r_same = run(txn, [cmd("dns.set", settings=good),
                                    cmd("dns.set", settings={"domain": "-x"}),
                                    cmd("dns.set", settings=good)])
    assert r_ok["ok"] and r_ok["value"]["domain"] == "corp.example"
    assert not r_bad["ok"] and r_bad["code"] == "invalid_setting" and "not a DNS name" in r_bad["message"]
    assert r_same["ok"]
    assert dns_config.stored_settings(txn)["domain"] == "corp.example"
    assert audit_actions(txn) == [("dns.set", "dns")]  # an unchanged setting audits nothing


def test_every_netmap_carries_the_dns_settings_and_a_change_reaches_all_nodes():
    txn = DictTxn()
    results = run(txn, setup(ephemeral=False))
    nodes = [n for _, n in txn.items("nodes")]
    policy = {"version": 1, "text": ALLOW_ALL, "compiled": compile_policy(parse_policy(ALLOW_ALL))}
    feed = NetmapFeed(policy, nodes, 100.0, len(results), dns=dns_config.default_settings())
    held = {k: feed.full(k) for k in ("n1", "n2")}
    assert all(m.dns["domain"] == dns_config.DEFAULT_DOMAIN for m in held.values())
    new = dns_config.validated({"domain": "corp.example", "nameservers": ["9.9.9.9"]})
    v = len(results) + 1
    c = cmd("dns.set", settings=new)
    update = feed.apply_batch([(v, c, {"ok": True, "version": v, "value": new})])
    assert set(update.deltas) == {"n1", "n2"}
    for k, d in update.deltas.items():
        after = apply_delta(held[k], d)
        assert after.dns == new and after == feed.full(k)
        assert Netmap.from_json(after.to_json()) == after  # the wire form keeps it
    assert feed.resume("n1", len(results)).dns == new  # an agent resuming gets it too


# -- per-node key expiry ----------------------------------------------------------------------
def test_key_expiry_disabled_for_one_node_survives_key_rotation():
    txn = DictTxn()
    run(txn, setup())
    r = run(txn, [cmd("node.key_expiry", id="n1", disabled=True)], start=10)[0]
    assert r["ok"] and r["value"]["key_expiry"] is None and r["value"]["key_expiry_disabled"]
    r = run(txn, [cmd("node.rotate_key", id="n1", old_node_key="nk1", node_key="nk9",
                      key_expiry=900.0)], start=11)[0]
    assert r["value"]["key_expiry"] is None  # the proposer's default does not apply to it
    r = run(txn, [cmd("node.key_expiry", id="n1", disabled=False, key_expiry=2000.0)], start=12)[0]
    assert r["value"]["key_expiry"] == 2000.0 and not r["value"]["key_expiry_disabled"]
    assert [a for a in audit_actions(txn) if a[0] == "node.key_expiry"] == \
        [("node.key_expiry", "node:n1")] * 2
    missing = run(txn, [cmd("node.key_expiry", id="nope", disabled=True)], start=13)[0]
    assert missing["status"] == 404


# -- ephemeral nodes --------------------------------------------------------------------------
def test_ephemeral_nodes_due_are_those_offline_past_the_limit():
    nodes = [{"id": "a", "ephemeral": True, "online": False, "last_seen": 100.0},
             {"id": "b", "ephemeral": True, "online": True, "last_seen": 0.0},
             {"id": "c", "ephemeral": False, "online": False, "last_seen": 0.0},
             {"id": "d", "ephemeral": True, "online": False, "last_seen": None, "created_at": 50.0}]
    assert lifecycle.due_ephemeral(nodes, 60.0, 159.0) == ["d"]
    assert lifecycle.due_ephemeral(nodes, 60.0, 160.0) == ["a", "d"]


def test_removal_rechecks_every_node_when_applied():
    txn = DictTxn()
    run(txn, setup() + [cmd("lifecycle.set", ephemeral_offline_seconds=60.0),
                        cmd("node.presence", t=200.0, replica="r1",
                            changes=[{"id": "n2", "online": True, "session": "s"}])])
    # n1 never connected (created at 100): due at 160; n2 is online, so never due
    r = run(txn, [cmd("node.remove_ephemeral", t=150.0, ids=["n1", "n2"])], start=20)[0]
    assert r["ok"] and r["value"] == {"removed": []}
    r = run(txn, [cmd("node.remove_ephemeral", t=200.0, ids=["n1", "n2", "gone"])], start=21)[0]
    assert r["value"] == {"removed": ["n1"]}
    assert txn.get("nodes", "n1") is None and txn.get("node_names", "web") is None
    assert ("node.remove_ephemeral", "node:n1") in audit_actions(txn)
    assert ("lifecycle.set", "lifecycle") in audit_actions(txn)


def test_a_node_whose_replica_restarted_counts_as_offline_from_the_sweep():
    """Its stream may have lived until the replica went: it is not removed for the time since
    it connected."""
    txn = DictTxn()
    run(txn, setup() + [cmd("lifecycle.set", ephemeral_offline_seconds=60.0),
                        cmd("node.presence", t=110.0, replica="r1",
                            changes=[{"id": "n2", "online": True, "session": "s"}]),
                        cmd("node.presence_sweep", t=1000.0, replica="r1")])
    r = run(txn, [cmd("node.remove_ephemeral", t=1030.0, ids=["n2"])], start=20)[0]
    assert r["value"] == {"removed": []}
    r = run(txn, [cmd("node.remove_ephemeral", t=1060.0, ids=["n2"])], start=21)[0]
    assert r["value"] == {"removed": ["n2"]}


def test_lifecycle_setting_out_of_range_is_refused():
    txn = DictTxn()
    r = run(txn, [cmd("lifecycle.set", ephemeral_offline_seconds=1.0)])[0]
    assert r["status"] == 400 and "between 10 seconds" in r["message"]
    assert lifecycle.stored_settings(txn) == lifecycle.default_settings()


def test_removed_ephemeral_nodes_vanish_from_every_netmap():
    txn = DictTxn()
    results = run(txn, setup())
    nodes = [n for _, n in txn.items("nodes")]
    policy = {"version": 1, "text": ALLOW_ALL, "compiled": compile_policy(parse_policy(ALLOW_ALL))}
    feed = NetmapFeed(policy, nodes, 100.0, len(results))
    assert "n1" in feed.full("n2").peers
    c = cmd("node.remove_ephemeral", t=400.0, ids=["n1"])  # before its key expires at 500
    v = len(results) + 1
    update = feed.apply_batch([(v, c, {"ok": True, "version": v, "value": {"removed": ["n1"]}})])
    assert "n1" in update.gone and update.deltas["n2"].peers_removed == ("n1",)
    assert not feed.index.knows("n1")
