"""Policy parsing, validation (every error names its field), tests evaluation, tagOwners."""
from __future__ import annotations

import ipaddress
import json

import pytest

from raftmesh.proto.wire import PortRange
from raftmesh.cluster.names import USER_NAME_MAX_LENGTH, is_user_name
from raftmesh.cluster.policy import (MAX_ENTRIES, MAX_POLICY_BYTES, MAX_WARNINGS, Identity, Policy,
                                     PolicyError, PolicyTooLarge, parse_policy)
from raftmesh.cluster.policy_syntax import protocol

BASE = {
    "groups": {"group:eng": ["alice", "bob@"], "group:ops": ["carol"]},
    "tagOwners": {"tag:web": ["group:eng"], "tag:db": ["carol", "autogroup:admin"],
                  "tag:ci": ["tag:web"]},
    "hosts": {"db-net": "10.5.0.0/16", "printer": "192.168.1.9"},
}


def doc(**extra) -> str:
    return json.dumps({**BASE, **extra})


def errors(text: str) -> list[dict[str, str]]:
    with pytest.raises(PolicyError) as e:
        parse_policy(text)
    assert e.value.errors, "a PolicyError always carries entries"
    return e.value.errors


def acl(src, dst, **kw):
    return {"action": "accept", "src": src, "dst": dst, **kw}


# -- HuJSON --------------------------------------------------------------------------------
def test_hujson_comments_and_trailing_commas():
    p = parse_policy("""
    // a line comment
    {
      /* a block comment */
      "groups": {"group:eng": ["alice",],},   // trailing commas everywhere
      "acls": [
        {"action": "accept", "src": ["group:eng"], "dst": ["*:22",],},
      ],
    }
    """)
    assert p.groups == {"group:eng": frozenset({"alice"})}
    assert len(p.acls) == 1 and p.acls[0].dst[0].ports == (PortRange(22, 22),)


@pytest.mark.parametrize("text", ["", "{", "{'acls': [}", '{"acls": [], "acls": []}'])
def test_unparseable_or_duplicate_keys(text):
    (e,) = errors(text)
    assert e["path"] == "$" and "HuJSON" in e["message"]


def test_limits_name_what_is_too_large():
    big = '{"acls": []}' + " " * MAX_POLICY_BYTES
    with pytest.raises(PolicyTooLarge) as e:
        parse_policy(big)
    assert e.value.errors == [{"path": "$", "message": f"the policy is {len(big)} bytes; the "
                                                       f"limit is {MAX_POLICY_BYTES}"}]
    many = {"hosts": {f"h{i}": f"10.0.{i // 250}.{i % 250}" for i in range(MAX_ENTRIES["hosts"] + 1)},
            "acls": [acl(["*"], ["*:22"])] * 10_000}  # fewer than the limit
    assert errors(json.dumps(many)) == [
        {"path": "hosts", "message": f"{MAX_ENTRIES['hosts'] + 1} entries; the limit is 5000"}]
    assert errors(json.dumps({"acls": [{}] * (MAX_ENTRIES["acls"] + 1)})) == [
        {"path": "acls", "message": f"{MAX_ENTRIES['acls'] + 1} entries; the limit is 20000"}]
    proto = "tcp"
    for _ in range(14):
        proto = [proto]
    deep = json.dumps({"acls": [acl(["*"], ["*:22"], proto=proto)]})  # 3 + 14 levels
    assert errors(deep) == [{"path": "$", "message": "not valid HuJSON: nested 17 levels deep; "
                                                     "the limit is 16"}]


@pytest.mark.parametrize("text", ["[]", "3", '"x"', "null"])
def test_top_level_must_be_object(text):
    assert errors(text) == [{"path": "$", "message": "the policy must be an object"}]


def test_empty_policy_denies_everything():
    for p in (parse_policy("{}"), Policy()):
        assert p.acls == ()
        assert not p.allows(Identity("user", "alice"), Identity("user", "alice"), 22)


def test_policy_error_message_lists_paths():
    e = PolicyError([{"path": "acls[0].src", "message": "is required"}])
    assert str(e) == "acls[0].src: is required"


# -- validation: every error names rule and field ----------------------------------------------
ERROR_CASES = [
    # top level and sections
    ({"sshRules": []}, "sshRules", "unknown key"),
    ({"ssh": {}}, "ssh", "must be a list"),
    ({"ssh": [{"action": "accept", "source": []}]}, "ssh[0].source", "unknown key"),
    ({"nodeAttrs": [{"target": ["*"], "attrs": []}]}, "nodeAttrs[0].attrs", "unknown key"),
    ({"autoApprovers": {"route": {}}}, "autoApprovers.route", "unknown key"),
    ({"disableIPv4": "yes"}, "disableIPv4", "true or false"),
    ({"acls": {}}, "acls", "must be a list"),
    ({"acls": ["x"]}, "acls[0]", "must be an object"),
    ({"groups": []}, "groups", "must be an object"),
    ({"tagOwners": "x"}, "tagOwners", "must be an object"),
    ({"hosts": 1}, "hosts", "must be an object"),
    ({"tests": {}}, "tests", "must be a list"),
    # acls
    ({"acls": [acl(["*"], ["*:*"]), {**acl(["*"], ["*:*"]), "users": ["*"]}]},
     "acls[1].users", "legacy name of src"),
    ({"acls": [acl(["*"], ["*:*"]), {**acl(["*"], ["*:*"]), "sources": ["*"]}]},
     "acls[1].sources", "unknown key"),
    ({"acls": [{"src": ["*"], "dst": ["*:*"]}]}, "acls[0].action", "is required"),
    ({"acls": [acl(["*"], ["*:*"], action="deny")]}, "acls[0].action", "must be 'accept'"),
    ({"acls": [{"action": "accept", "dst": ["*:*"]}]}, "acls[0].src", "is required"),
    ({"acls": [{"action": "accept", "src": ["*"]}]}, "acls[0].dst", "is required"),
    ({"acls": [acl([], ["*:*"])]}, "acls[0].src", "must not be empty"),
    ({"acls": [acl("*", ["*:*"])]}, "acls[0].src", "must be a list"),
    ({"acls": [acl(["*", 3], ["*:*"])]}, "acls[0].src[1]", "must be a string"),
    ({"acls": [acl(["group:nope"], ["*:*"])]}, "acls[0].src[0]", "unknown group"),
    ({"acls": [acl(["*"], ["*:*", "tag:nope:22"])]}, "acls[0].dst[1]", "unknown tag"),
    ({"acls": [acl(["*"], ["*:*"]), acl(["autogroup:self"], ["*:*"])]},
     "acls[1].src[0]", "only valid in dst"),
    ({"acls": [acl(["autogroup:admins"], ["*:*"])]}, "acls[0].src[0]", "unknown autogroup"),
    ({"acls": [acl(["autogroup:internet"], ["*:*"])]}, "acls[0].src[0]", "only valid in dst"),
    ({"acls": [acl(["*"], ["autogroup:nonroot:*"])]}, "acls[0].dst[0]", "unknown autogroup"),
    ({"acls": [acl(["ipset:nope"], ["*:*"])]}, "acls[0].src[0]", "unknown IP set"),
    ({"acls": [acl(["*"], ["*:*"], srcPosture="posture:x")]}, "acls[0].srcPosture", "list of"),
    ({"acls": [acl(["Not A User"], ["*:*"])]}, "acls[0].src[0]", "unknown src"),
    ({"acls": [acl(["10.0.0.0/33"], ["*:*"])]}, "acls[0].src[0]", "not an IP or CIDR"),
    ({"acls": [acl(["*"], ["tag:web"])]}, "acls[0].dst[0]", "bad ports"),
    ({"acls": [acl(["*"], ["22"])]}, "acls[0].dst[0]", "must be host:ports"),
    ({"acls": [acl(["*"], [":22"])]}, "acls[0].dst[0]", "must be host:ports"),
    ({"acls": [acl(["*"], ["tag:web:http"])]}, "acls[0].dst[0]", "bad ports"),
    ({"acls": [acl(["*"], ["tag:web:"])]}, "acls[0].dst[0]", "bad ports"),
    ({"acls": [acl(["*"], ["tag:web:80,"])]}, "acls[0].dst[0]", "bad ports"),
    ({"acls": [acl(["*"], ["tag:web:-5"])]}, "acls[0].dst[0]", "bad ports"),
    ({"acls": [acl(["*"], ["tag:web:70000"])]}, "acls[0].dst[0]", "0-65535"),
    ({"acls": [acl(["*"], ["tag:web:90-80"])]}, "acls[0].dst[0]", "low to high"),
    ({"acls": [acl(["*"], ["tag:web:\u0661"])]}, "acls[0].dst[0]", "bad ports"),
    ({"acls": [acl(["*"], ["*:*"], proto="sctpp")]}, "acls[0].proto", "not a protocol"),
    ({"acls": [acl(["*"], ["*:*"], proto="256")]}, "acls[0].proto", "not a protocol"),
    ({"acls": [acl(["*"], ["*:*"], proto="06")]}, "acls[0].proto", "not a protocol"),
    ({"acls": [acl(["*"], ["*:*"], proto="*")]}, "acls[0].proto", "not a protocol"),
    ({"acls": [acl(["*"], ["*:22"], proto="icmp")]}, "acls[0].dst[0]", "icmp has no ports"),
    ({"acls": [acl(["*"], ["*:22"], proto="47")]}, "acls[0].dst[0]", "gre has no ports"),
    # grants
    ({"grants": [{"src": ["*"], "dst": ["*"]}]}, "grants[0]", "needs ip"),
    ({"grants": [{"dst": ["*"], "ip": ["*"]}]}, "grants[0].src", "is required"),
    ({"grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"], "action": "accept"}]},
     "grants[0].action", "unknown key"),
    ({"grants": [{"src": ["*"], "dst": ["tag:web:443"], "ip": ["*"]}]}, "grants[0].dst[0]",
     "unknown tag"),
    ({"grants": [{"src": ["*"], "dst": ["*"], "ip": ["tcp:http"]}]}, "grants[0].ip[0]", "bad ports"),
    ({"grants": [{"src": ["*"], "dst": ["*"], "ip": ["bogus:80"]}]}, "grants[0].ip[0]",
     "not a protocol"),
    ({"grants": [{"src": ["*"], "dst": ["*"], "ip": ["icmp:8"]}]}, "grants[0].ip[0]", "no ports"),
    ({"grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"], "app": []}]}, "grants[0].app",
     "must be an object"),
    ({"grants": [{"src": ["tag:web"], "dst": ["autogroup:self"], "ip": ["*"]}]},
     "grants[0].src[0]", "autogroup:self"),
    ({"grants": [{"src": ["*"], "dst": ["*"], "ip": [], "app": {}}]}, "grants[0]", "needs ip"),
    ({"grants": [{"src": ["*"], "dst": ["0.0.0.0/0"], "ip": ["*"]}]}, "grants[0].dst[0]",
     "every address"),
    ({"grants": [{"src": ["*"], "dst": ["autogroup:danger-all"], "ip": ["*"]}]},
     "grants[0].dst[0]", "only valid in src"),
    ({"grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"], "via": ["tag:nope"]}]},
     "grants[0].via[0]", "via names a router by tag"),
    ({"grants": [{"src": ["*"], "dst": ["*"], "app": {"dashboard": [{}]}}]},
     "grants[0].app.dashboard", "example.com/cap/name"),
    ({"grants": [{"src": ["user:nobody here"], "dst": ["*"], "ip": ["*"]}]},
     "grants[0].src[0]", "not a valid user"),
    ({"acls": [acl(["tag:web"], ["autogroup:self:*"])]}, "acls[0].src[0]", "autogroup:self"),
    ({"acls": [acl(["group:eng", "autogroup:tagged"], ["autogroup:self:*"])]},
     "acls[0].src[1]", "autogroup:self"),
    ({"acls": [acl(["printer"], ["autogroup:self:*"])]}, "acls[0].src[0]", "autogroup:self"),
    # groups
    ({"groups": {"eng": ["alice"]}}, "groups.eng", "group:eng"),
    ({"groups": {"group:x": "alice"}}, "groups.group:x", "must be a list"),
    ({"groups": {"group:x": ["alice", 1]}}, "groups.group:x[1]", "must be a string"),
    ({"groups": {"group:x": ["alice", "group:eng"]}}, "groups.group:x[1]", "only users"),
    ({"groups": {"group:x": ["Alice Smith"]}}, "groups.group:x[0]", "not a valid user"),
    ({"groups": {"group:x": ["alice@exa mple.com"]}}, "groups.group:x[0]", "not a valid user"),
    ({"groups": {"group:x": ["alice@example.com\n"]}}, "groups.group:x[0]", "not a valid user"),
    ({"groups": {"group:x": ["a" * 250 + "@b.co"]}}, "groups.group:x[0]", "not a valid user"),
    # tagOwners
    ({"tagOwners": {"tag:Web": []}}, "tagOwners.tag:Web", "tags look like"),
    ({"tagOwners": {"web": []}}, "tagOwners.web", "tags look like"),
    ({"tagOwners": {"tag:a": ["group:nope"]}}, "tagOwners.tag:a[0]", "unknown group"),
    ({"tagOwners": {"tag:a": ["alice", "tag:nope"]}}, "tagOwners.tag:a[1]", "unknown tag"),
    ({"tagOwners": {"tag:a": ["autogroup:member"]}}, "tagOwners.tag:a[0]", "autogroup:admin"),
    # hosts
    ({"hosts": {"db": "not-an-ip"}}, "hosts.db", "not an IP or CIDR"),
    ({"hosts": {"db": 5}}, "hosts.db", "must be an IP"),
    ({"hosts": {"10.0.0.1": "10.0.0.1"}}, "hosts.10.0.0.1", "not a valid host name"),
    ({"hosts": {"bad name": "10.0.0.1"}}, "hosts.bad name", "not a valid host name"),
    # tests
    ({"tests": ["x"]}, "tests[0]", "must be an object"),
    ({"tests": [{"src": "alice", "allow": []}]}, "tests[0].allow", "unknown key"),
    ({"tests": [{"accept": []}]}, "tests[0].src", "is required"),
    ({"tests": [{"src": "group:nope"}]}, "tests[0].src", "unknown group"),
    ({"tests": [{"src": "autogroup:member"}]}, "tests[0].src", "user, tag, host or IP"),
    ({"tests": [{"src": "alice", "accept": ["group:eng:22"]}]}, "tests[0].accept[0]",
     "user, tag, host or IP"),
    ({"tests": [{"src": "*"}]}, "tests[0].src", "user, tag, host or IP"),
    ({"tests": [{"src": 3}]}, "tests[0].src", "must be a string"),
    ({"tests": [{"src": "tag:nope"}]}, "tests[0].src", "unknown tag"),
    ({"tests": [{"src": "alice", "proto": "grease"}]}, "tests[0].proto", "not a protocol"),
    ({"tests": [{"src": "alice", "accept": ["tag:web"]}]}, "tests[0].accept[0]", "host:port"),
    ({"tests": [{"src": "alice", "accept": ["tag:web:80-90"]}]}, "tests[0].accept[0]", "one port"),
    ({"tests": [{"src": "alice", "deny": ["ok:1", "tag:nope:22"]}]}, "tests[0].deny[1]", "unknown tag"),
    ({"tests": [{"src": "alice", "deny": "x:1"}]}, "tests[0].deny", "must be a list"),
]


@pytest.mark.parametrize("extra,path,message", ERROR_CASES, ids=[c[1] for c in ERROR_CASES])
def test_validation_error_names_rule_and_field(extra, path, message):
    errs = errors(doc(**extra))
    assert any(e["path"] == path and message in e["message"] for e in errs), errs


def test_all_errors_are_reported_at_once():
    errs = errors(doc(acls=[acl(["group:nope"], ["*:*"]), acl(["*"], ["tag:nope:1", "*:x"])],
                      tests=[{"src": "tag:nope"}]))
    assert [e["path"] for e in errs] == ["acls[0].src[0]", "acls[1].dst[0]", "acls[1].dst[1]",
                                         "tests[0].src"]


def test_tests_are_not_run_when_the_policy_is_malformed():
    errs = errors(doc(acls=[acl(["group:nope"], ["*:*"])],
                      tests=[{"src": "alice", "accept": ["bob:22"]}]))
    assert [e["path"] for e in errs] == ["acls[0].src[0]"]


# -- selectors, ports and proto -------------------------------------------------------------
def test_ports_forms():
    p = parse_policy(doc(acls=[acl(["*"], ["tag:web:*", "tag:web:22", "tag:web:443,80",
                                           "tag:web:8000-8100,22", "tag:web:0"])]))
    assert [d.ports for d in p.acls[0].dst] == [
        (PortRange(0, 65535),), (PortRange(22, 22),), (PortRange(80, 80), PortRange(443, 443)),
        (PortRange(22, 22), PortRange(8000, 8100)), (PortRange(0, 0),)]


def test_selector_kinds():
    p = parse_policy(doc(acls=[acl(
        ["*", "alice", "bob@", "group:eng", "tag:web", "autogroup:member", "autogroup:tagged",
         "printer", "10.0.0.0/8", "fd7a:115c:a1e0::1"],
        ["autogroup:member:*", "db-net:5432", "[fd7a:115c:a1e0::2]:22", "fd7a:115c:a1e0::/48:80",
         "100.64.0.1:22"])]))
    src = [(s.kind, s.users or s.tag or s.prefix and str(s.prefix)) for s in p.acls[0].src]
    assert src == [("any", None), ("users", frozenset({"alice"})),
                   ("users", frozenset({"bob"})), ("users", frozenset({"alice", "bob"})),
                   ("tag", "tag:web"), ("member", None), ("tagged", None),
                   ("prefix", "192.168.1.9/32"), ("prefix", "10.0.0.0/8"),
                   ("prefix", "fd7a:115c:a1e0::1/128")]
    dst = [(d.selector.kind, str(d.selector.prefix)) for d in p.acls[0].dst]
    assert dst == [("member", "None"), ("prefix", "10.5.0.0/16"), ("prefix", "fd7a:115c:a1e0::2/128"),
                   ("prefix", "fd7a:115c:a1e0::/48"), ("prefix", "100.64.0.1/32")]


def test_host_alias_wins_over_user_of_same_name_but_trailing_at_means_user():
    p = parse_policy(json.dumps({"hosts": {"alice": "10.0.0.1"},
                                 "acls": [acl(["alice", "alice@"], ["*:*"])]}))
    assert [s.kind for s in p.acls[0].src] == ["prefix", "users"]


def U(name: str) -> Identity:
    return Identity("user", name)


def T(tag: str) -> Identity:
    return Identity("tag", tag)


def IP(text: str) -> Identity:
    return Identity("prefix", text, ipaddress.ip_network(text))


def test_allows_semantics():
    p = parse_policy(doc(acls=[
        acl(["group:eng"], ["tag:web:80,443"]),
        acl(["autogroup:member"], ["autogroup:self:*"]),
        acl(["tag:web"], ["tag:db:5432"], proto="tcp"),
        acl(["autogroup:tagged"], ["printer:9100"], proto="udp"),
        acl(["10.5.0.0/16"], ["autogroup:member:22"]),
        acl(["carol"], ["db-net:*"], proto="icmp"),
    ]))
    assert p.allows(U("alice"), T("tag:web"), 443) and p.allows(U("bob"), T("tag:web"), 80)
    assert not p.allows(U("alice"), T("tag:web"), 22)
    assert not p.allows(U("carol"), T("tag:web"), 80)
    assert p.allows(U("carol"), U("carol"), 1) and not p.allows(U("carol"), U("alice"), 1)
    assert not p.allows(T("tag:web"), T("tag:web"), 1)  # self is for users' devices only
    assert p.allows(T("tag:web"), T("tag:db"), 5432)
    assert not p.allows(T("tag:web"), T("tag:db"), 5432, "udp")
    assert p.allows(T("tag:db"), IP("192.168.1.9"), 9100, "udp")
    assert not p.allows(T("tag:db"), IP("192.168.1.9"), 9100, "tcp")
    assert p.allows(IP("10.5.3.4"), U("alice"), 22) and not p.allows(IP("10.6.0.1"), U("alice"), 22)
    assert p.allows(IP("10.5.3.0/24"), U("alice"), 22) and not p.allows(IP("10.0.0.0/8"), U("alice"), 22)
    assert p.allows(U("carol"), IP("10.5.1.1"), 0, "icmp")
    assert not p.allows(U("carol"), IP("10.5.1.1"), 0, "tcp")
    assert p.check("alice", "tag:web:80") and not p.check("alice@", "tag:web:81")
    with pytest.raises(PolicyError):
        p.check("alice", "tag:nope:80")


def test_star_reaches_any_destination():
    p = parse_policy(doc(acls=[acl(["*"], ["*:22"])]))
    for src in (U("a"), T("tag:web"), IP("10.0.0.1")):
        for dst in (U("b"), T("tag:db"), IP("192.168.1.9")):
            assert p.allows(src, dst, 22) and not p.allows(src, dst, 23)


# -- the tests section -------------------------------------------------------------------------
def test_passing_tests_accept_the_policy():
    p = parse_policy(doc(
        acls=[acl(["group:eng"], ["tag:web:443", "autogroup:self:22"])],
        tests=[{"src": "alice", "accept": ["tag:web:443", "alice:22"],
                "deny": ["tag:web:80", "bob:22", "tag:db:443"]},
               {"src": "bob@", "proto": "udp", "accept": ["tag:web:443"]},
               {"src": "carol", "deny": ["tag:web:443"]}]))
    assert len(p.tests) == 3


def test_failing_tests_reject_the_policy_naming_the_test():
    errs = errors(doc(
        acls=[acl(["group:eng"], ["tag:web:443"], proto="tcp")],
        tests=[{"src": "alice", "accept": ["tag:web:443"]},
               {"src": "alice", "accept": ["tag:web:443", "tag:web:80"], "deny": ["tag:web:443"]},
               {"src": "bob", "proto": "udp", "accept": ["tag:web:443"]}]))
    assert [e["path"] for e in errs] == ["tests[1].accept[1]", "tests[1].deny[0]",
                                         "tests[2].accept[0]"]
    assert "alice -> tag:web:80 (tcp) is denied" in errs[0]["message"]
    assert "is accepted by the policy but the test expects deny" in errs[1]["message"]


def test_tests_with_hosts_and_ips():
    parse_policy(doc(acls=[acl(["printer"], ["db-net:5432"])],
                     tests=[{"src": "printer", "accept": ["db-net:5432", "10.5.9.9:5432"],
                             "deny": ["10.6.0.1:5432", "alice:5432"]},
                            {"src": "192.168.1.9", "accept": ["[10.5.0.1]:5432"]}]))


def test_tests_with_the_internet_through_exit_nodes():
    """autogroup:internet:PORT as a test destination, as in dst: only autogroup:internet
    reaches it (not `*` or a prefix), as netmaps have it."""
    p = parse_policy(doc(
        acls=[acl(["alice"], ["autogroup:internet:443"]), acl(["bob"], ["*:*", "0.0.0.0/0:*"])],
        tests=[{"src": "alice", "accept": ["autogroup:internet:443"],
                "deny": ["autogroup:internet:80", "tag:web:443"]},
               {"src": "bob", "accept": ["tag:web:443"], "deny": ["autogroup:internet:443"]}]))
    assert len(p.tests) == 2
    errs = errors(doc(acls=[acl(["bob"], ["*:*"])],
                      tests=[{"src": "bob", "accept": ["autogroup:internet:443"]}]))
    assert errs[0]["path"] == "tests[0].accept[0]" and "is denied" in errs[0]["message"]
    errs = errors(doc(tests=[{"src": "autogroup:internet", "deny": ["alice:22"]}]))
    assert errs[0]["path"] == "tests[0].src"


def test_empty_policy_with_tests_expecting_access_fails():
    errs = errors(json.dumps({"tests": [{"src": "alice", "accept": ["alice:22"]}]}))
    assert errs[0]["path"] == "tests[0].accept[0]"


# -- tagOwners ---------------------------------------------------------------------------------
def test_tag_owners_allow():
    p = parse_policy(doc())
    assert p.tag_owners_allow("alice", "tag:web", False)  # via group:eng
    assert p.tag_owners_allow("bob@", "tag:web", False)
    assert not p.tag_owners_allow("carol", "tag:web", False)
    assert p.tag_owners_allow("carol", "tag:db", False)  # direct
    assert not p.tag_owners_allow("alice", "tag:db", False)
    assert not p.tag_owners_allow(None, "tag:db", False)
    assert not p.tag_owners_allow("alice", "tag:ci", False)  # owned by a tag, not a user
    for tag in ("tag:web", "tag:db", "tag:ci"):
        assert p.tag_owners_allow(None, tag, True)  # admin scope: any declared tag
    assert not p.tag_owners_allow(None, "tag:undeclared", True)
    assert not p.tag_owners_allow("carol", "tag:undeclared", False)
    assert not Policy().tag_owners_allow(None, "tag:web", True)


def test_tag_with_empty_owner_list_exists_for_admins_only():
    p = parse_policy('{"tagOwners": {"tag:x": []}}')
    assert p.tag_owners_allow(None, "tag:x", True) and not p.tag_owners_allow("alice", "tag:x", False)


# -- what Tailscale files bring ------------------------------------------------------------------
TOO_LONG = "x@" + ".".join(["a" * 60] * 5)  # each part valid, the whole over the limit


@pytest.mark.parametrize("name,valid", [
    ("alice", True), ("alice@example.com", True), ("Ada.Lovelace+vpn@Example.co.uk", True),
    ("alice@github", True), ("a" * 64 + "@example.com", True),
    (TOO_LONG, False),
    ("a" * 65 + "@example.com", False), ("Alice", False), ("alice@", False), ("@example.com", False),
    ("alice@example.com\n", False), ("alice\n", False), ("al ice@example.com", False),
    ("alice@exa_mple.com", False), ("alice@-example.com", False), ("alice@@example.com", False),
    ("alice/bob@example.com", False), ("", False)])
def test_a_user_name_is_a_plain_name_or_an_email_address(name, valid):
    assert is_user_name(name) is valid
    assert len(TOO_LONG) > USER_NAME_MAX_LENGTH


def test_email_users_everywhere_a_user_appears():
    p = parse_policy(json.dumps({
        "groups": {"group:eng": ["ada@example.com", "bob@"]},
        "tagOwners": {"tag:web": ["ada@example.com"], "tag:db": ["group:eng"]},
        "acls": [acl(["ada@example.com", "user:carol@example.org"], ["bob@example.com:22"])],
        "tests": [{"src": "user:ada@example.com", "accept": ["bob@example.com:22"],
                   "deny": ["ada@example.com:22"]},
                  {"src": "group:eng", "deny": ["tag:web:22"]}]}))
    assert p.groups["group:eng"] == {"ada@example.com", "bob"}
    assert p.tag_owners_allow("ada@example.com", "tag:web", False)
    assert p.tag_owners_allow("bob", "tag:db", False)
    assert [s.users for s in p.acls[0].src] == [{"ada@example.com"}, {"carol@example.org"}]
    assert p.check("carol@example.org", "bob@example.com:22")
    assert [t.src.value for t in p.tests] == ["ada@example.com", "ada@example.com", "bob"]


def test_a_group_as_test_source_is_tested_as_each_member_and_paths_survive_skipped_tests():
    errs = errors(json.dumps({
        "groups": {"group:eng": ["ada@example.com", "bob@example.com"]},
        "acls": [acl(["ada@example.com"], ["*:22"])],
        "tests": [{"src": "ada@example.com", "proto": "gre", "accept": ["10.0.0.1:22"]},
                  {"src": "group:eng", "accept": ["10.0.0.1:22"]}]}))
    assert errs == [{"path": "tests[1].accept[0]", "message": "bob@example.com -> 10.0.0.1:22 "
                     "(tcp) is denied by the policy but the test expects accept"}]


def test_host_bits_name_the_prefix_they_belong_to():
    p = parse_policy(json.dumps({"hosts": {"farm": "10.20.10.1/29"},
                                 "acls": [acl(["192.168.1.9/24"], ["farm:443", "fd7a::1/64:22"])],
                                 "tests": [{"src": "192.168.1.77", "accept": ["10.20.10.6:443"],
                                            "deny": ["10.20.10.8:443"]}]}))
    assert str(p.hosts["farm"]) == "10.20.10.0/29"
    assert str(p.acls[0].src[0].prefix) == "192.168.1.0/24"
    assert [str(d.selector.prefix) for d in p.acls[0].dst] == ["10.20.10.0/29", "fd7a::/64"]


@pytest.mark.parametrize("text,name", [
    ("tcp", "tcp"), ("TCP", "tcp"), ("6", "tcp"), ("17", "udp"), ("1", "icmp"), ("58", "ipv6-icmp"),
    ("132", "sctp"), ("ip-in-ip", "ipv4"), ("4", "ipv4"), ("47", "gre"), ("50", "esp"),
    ("51", "ah"), ("2", "igmp"), ("115", "115"), ("255", "255"),
    ("0", None), ("256", None), ("06", None), ("*", None), ("", None), ("tcp ", None),
    ("+6", None), ("١", None)])
def test_protocols_by_name_or_iana_number(text, name):
    assert protocol(text) == name


def test_protocols_agents_cannot_filter_grant_nothing_and_say_so():
    p = parse_policy(json.dumps({"acls": [acl(["*"], ["*:*"], proto="esp"),
                                          acl(["*"], ["*:443"], proto="TCP")],
                                 "grants": [{"src": ["*"], "dst": ["*"],
                                             "ip": ["sctp:9899", "udp:53", "115:*"]}]}))
    assert [a.protos for a in p.acls] == [("tcp",), ("udp",)]
    assert [(w["code"], w["path"]) for w in p.warnings] == [
        ("proto_not_enforced", "acls[0].proto"), ("proto_not_enforced", "grants[0].ip[0]"),
        ("proto_not_enforced", "grants[0].ip[2]")]


def test_a_protocol_may_be_a_json_number():
    p = parse_policy(json.dumps({"acls": [acl(["*"], ["*:22"], proto=6)]}))
    assert p.acls[0].protos == ("tcp",)
    assert errors(json.dumps({"acls": [acl(["*"], ["*:*"], proto=True)]}))[0]["path"] == \
        "acls[0].proto"


def test_a_grant_with_an_empty_src_or_dst_grants_nothing():
    p = parse_policy(json.dumps({"grants": [{"src": [], "dst": ["*"], "ip": ["*"]},
                                            {"src": ["*"], "dst": [], "ip": ["*"]}]}))
    assert p.acls == () and p.warnings == ()


def test_warnings_are_bounded():
    many = [acl(["*"], ["*:*"], srcPosture=["posture:x"])] * (MAX_WARNINGS + 50)
    p = parse_policy(json.dumps({"postures": {"posture:x": []}, "acls": many}))
    assert len(p.warnings) == MAX_WARNINGS + 1 and p.acls == ()
    assert p.warnings[-1]["code"] == "warnings_truncated"


def test_kept_sections_that_say_nothing_earn_no_warning():
    p = parse_policy(json.dumps({"ssh": [], "nodeAttrs": [], "postures": {}, "ipsets": {},
                                 "autoApprovers": {}, "disableIPv4": False, "sshTests": [],
                                 "randomizeClientPort": False, "acls": []}))
    assert p.warnings == ()
