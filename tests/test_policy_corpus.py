"""Tailscale policy files load with Tailscale's meaning: the compatibility corpus.

Each `tests/policy_corpus/<construct>.hujson` is a policy written in Tailscale's own syntax
for one documented construct; `<construct>.expect.json` beside it says, from the policy
reference's description of that construct (not from raftmesh's output), which warnings
the file earns and what every node of NODES sees: its peers and what its packet filter
accepts. The policy goes the way a stored policy does (parse, compile to the replicated
form, read back) and the netmaps come from both the reference computation and the
incremental index, which must agree.

The packet filter is compared as what it accepts, not how it is grouped into rules:
"SRC -> DST:PORTS PROTOS" lines, one per source, destination and port range, with the
protocols allowed there (a rule without protocols allows tcp, udp and icmp; icmp has no
ports, so it is listed with the rule's ports). A node an expectation does not list has no
peers and accepts nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from raftmesh.cluster.netmap import NetmapIndex, compute_netmaps
from raftmesh.cluster.policy import parse_policy
from raftmesh.cluster.policy_form import compile_policy, read_form
from raftmesh.proto.wire import PROTOCOLS, Netmap

CORPUS = Path(__file__).parent / "policy_corpus"
CONSTRUCTS = sorted(p.name.removesuffix(".hujson") for p in CORPUS.glob("*.hujson"))


def _node(name: str, last_octet: int, user: str | None = None, tags=(), routes=()) -> dict:
    return {"id": name, "name": name, "user": user, "tags": list(tags), "node_key": f"key-{name}",
            "ipv4": f"100.64.0.{last_octet}", "ipv6": None, "endpoints": [], "key_expiry": None,
            "expired": False, "approved": True, "approved_routes": list(routes),
            "last_seen": None, "online": True}


# The fixed tailnet every corpus policy is evaluated on (IPv4 only, to keep expectations short).
NODES = [
    _node("ada-laptop", 1, user="ada@example.com"),
    _node("ada-phone", 2, user="ada@example.com"),
    _node("bob-laptop", 3, user="bob@example.com"),
    _node("web", 4, tags=["tag:web"]),
    _node("db", 5, tags=["tag:db"]),
    _node("router", 6, tags=["tag:router"], routes=["10.20.0.0/16"]),
]


def accepted(netmap: Netmap) -> list[str]:
    """What a packet filter accepts, as the expectation lines (see the module docstring)."""
    allowed: dict[tuple[str, str], set[str]] = {}
    for rule in netmap.packet_filter:
        for src in rule.src:
            for dst in rule.dst:
                allowed.setdefault((src, f"{dst.prefix}:{dst.ports.to_json()}"), set()).update(
                    rule.protos or PROTOCOLS)
    return sorted(f"{src} -> {dst} {','.join(p for p in PROTOCOLS if p in protos)}"
                  for (src, dst), protos in allowed.items())


def seen(netmaps: dict[str, Netmap]) -> dict[str, dict]:
    return {k: {"peers": sorted(m.peers), "accepts": accepted(m)} for k, m in netmaps.items()}


def expected(expect: dict) -> dict[str, dict]:
    listed = expect["netmaps"]
    unknown = set(listed) - {n["id"] for n in NODES}
    assert not unknown, f"the expectation names nodes not in NODES: {unknown}"
    return {n["id"]: {"peers": sorted(listed.get(n["id"], {}).get("peers", [])),
                      "accepts": sorted(listed.get(n["id"], {}).get("accepts", []))}
            for n in NODES}


def test_the_corpus_covers_every_construct_with_an_expectation():
    assert len(CONSTRUCTS) >= 15
    for name in CONSTRUCTS:
        assert (CORPUS / f"{name}.expect.json").is_file(), name
    assert {p.name.removesuffix(".expect.json") for p in CORPUS.glob("*.expect.json")} \
        == set(CONSTRUCTS)


@pytest.mark.parametrize("name", CONSTRUCTS)
def test_a_tailscale_policy_means_what_the_reference_says(name):
    expect = json.loads((CORPUS / f"{name}.expect.json").read_text())
    parsed = parse_policy((CORPUS / f"{name}.hujson").read_text())
    assert sorted({w["code"] for w in parsed.warnings}) == sorted(expect["warnings"]), \
        parsed.warnings
    policy = read_form(json.loads(json.dumps(compile_policy(parsed))))  # as replicas read it
    reference = compute_netmaps(policy, NODES, now=0.0, version=1)
    assert seen(reference) == expected(expect)
    index = NetmapIndex(policy, NODES, now=0.0)
    assert {k: index.netmap(k, 1) for k in reference} == reference
    for check in expect.get("checks", []):  # Policy.check: the policy's own tests' view
        assert parsed.check(check["src"], check["dst"], check.get("proto", "tcp")) \
            == check["allowed"], check
