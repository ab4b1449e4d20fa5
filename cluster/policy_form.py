"""The compiled policy: what netmaps are derived from, as versioned plain JSON.

The API parses a policy's HuJSON text once and proposes `policy.set` with both the text
(shown back, audited) and this form, which the state machine stores and every replica's
netmap feed reads. The form is fully resolved (groups expanded into their users, hosts
into prefixes, ports into ranges), so reading it involves no parsing decision: replicas
running different raftmesh versions during a rolling upgrade derive the same netmaps.

A replica that cannot read a form (a newer `format`, or malformed) raises
UnreadablePolicy; it must not fall back to another policy (api/map_stream.py, readiness).

Format 1:
    {"format": 1,
     "groups": {"group:eng": ["alice", ...]}, "tagOwners": {"tag:web": ["alice", ...]},
     "hosts": {"db": "10.0.0.0/16"},
     "selectors": [[text as written, kind, value], ...],
     "acls": [[[src selector index, ...], [[dst selector index, [[first port, last], ...]], ...],
               ["tcp", ...]], ...]}
    A selector's value is the sorted user list for kind "users", the tag for "tag", the
    prefix for "prefix", null for "any", "member", "tagged" and "self". Each distinct
    selector is listed once: a large policy names a few hundred in thousands of rules.
A policy's `tests` are not part of it: they are checked when the text is parsed. Nor are
its warnings, or what raftmesh does not enforce: grants, legacy acl fields, protocol numbers
and host bits resolve at parse time into the rules above, so format 1 carries them and a
replica that reads format 1 derives the same netmaps from them. A construct that needs a
new selector kind or protocol in this form needs a new format number.

Format 2: format 1 plus the selector kind "internet" (autogroup:internet: the internet
through exit nodes, value null); only policies using it are written in format 2, so the
others stay readable by replicas that read format 1 only.
Either format may carry "autoApprovers" (cluster/routes.py), which the state machine reads
and netmaps do not.
"""
from __future__ import annotations

import ipaddress
from typing import Any

from raftmesh.cluster.policy import Acl, DstEntry, Policy, Selector, parse_policy, PolicyError
from raftmesh.proto.wire import PROTOCOLS, PortRange

POLICY_FORMAT = 1
INTERNET_FORMAT = 2  # format 1 plus the selector kind "internet" (autogroup:internet)
SELECTOR_KINDS = ("any", "users", "member", "tagged", "tag", "self", "prefix", "idp_group",
                  "internet")


class UnreadablePolicy(ValueError):
    """A stored policy this replica cannot interpret; the message says why."""


def compile_policy(policy: Policy) -> dict:
    """The form of a parsed policy (parse_policy's result)."""
    index: dict[Selector, int] = {}
    for acl in policy.acls:
        for sel in (*acl.src, *(d.selector for d in acl.dst)):
            index.setdefault(sel, len(index))
    selectors = [_selector_form(sel) for sel in index]
    form = {
        # a replica that predates autogroup:internet must refuse such a policy, not read it
        # as granting nothing: only policies using it carry the newer format number
        "format": INTERNET_FORMAT if any(k == "internet" for _, k, _ in selectors)
        else POLICY_FORMAT,
        "groups": {g: sorted(users) for g, users in policy.groups.items()},
        "tagOwners": {t: sorted(users) for t, users in policy.tag_owners.items()},
        "hosts": {h: str(net) for h, net in policy.hosts.items()},
        "selectors": selectors,
        "acls": [[[index[s] for s in acl.src],
                  [[index[d.selector], [[r.first, r.last] for r in d.ports]] for d in acl.dst],
                  list(acl.protos)] for acl in policy.acls],
    }
    if policy.auto_approvers:  # read by the state machine (cluster/routes.py), not netmaps
        form["autoApprovers"] = policy.auto_approvers
    return form


def stored_policy(stored: dict) -> Policy:
    """The policy a `policy.set` command's args or a stored policy record hold.

    Entries written before the compiled form existed carry only the text; it was validated
    when proposed, so the current parser reads it (an error here means this parser version
    disagrees with the one that accepted it)."""
    form = stored.get("compiled")
    if form is not None:
        return read_form(form)
    try:
        return parse_policy(stored["text"])
    except PolicyError as e:
        raise UnreadablePolicy(f"its text no longer parses: {e}") from None


def read_form(form: Any) -> Policy:
    if not isinstance(form, dict) or "format" not in form:
        raise UnreadablePolicy("the compiled policy has no format number")
    if form["format"] not in (POLICY_FORMAT, INTERNET_FORMAT):
        raise UnreadablePolicy(f"the compiled policy is in format {form['format']!r}; this "
                               f"raftmesh reads formats {POLICY_FORMAT} and {INTERNET_FORMAT} "
                               "(upgrade this replica)")
    try:
        return _Reader().policy(form)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UnreadablePolicy(f"the compiled policy is malformed ({type(e).__name__}: {e})") \
            from None


def _selector_form(s: Selector) -> list:
    value = {"users": sorted(s.users), "tag": s.tag, "idp_group": s.group,
             "prefix": str(s.prefix) if s.prefix is not None else None}.get(s.kind)
    return [s.text, s.kind, value]


class _Reader:
    """Builds a Policy from a form, sharing one object per distinct user set and prefix."""

    def __init__(self):
        self._users: dict[tuple, frozenset[str]] = {}
        self._prefixes: dict[str, Any] = {}
        self.selectors: list[Selector] = []

    def policy(self, form: dict) -> Policy:
        self.selectors = [self.selector(sel) for sel in form["selectors"]]
        return Policy(
            groups={g: self.users(u) for g, u in form["groups"].items()},
            tag_owners={t: self.users(u) for t, u in form["tagOwners"].items()},
            hosts={h: self.prefix(p) for h, p in form["hosts"].items()},
            acls=tuple(self.acl(*a) for a in form["acls"]))

    def acl(self, src: list, dst: list, protos: list) -> Acl:
        if any(p not in PROTOCOLS for p in protos):
            raise ValueError(f"unknown protocol in {protos}")
        entries = tuple(DstEntry(self.selector_at(i), tuple(self.port_range(r) for r in ranges))
                        for i, ranges in dst)
        return Acl(tuple(self.selector_at(i) for i in src), entries, tuple(protos))

    def selector_at(self, i: int) -> Selector:
        if not isinstance(i, int) or i < 0:
            raise ValueError(f"bad selector index {i!r}")
        return self.selectors[i]

    def selector(self, sel: list) -> Selector:
        text, kind, value = sel
        if not isinstance(text, str) or kind not in SELECTOR_KINDS:
            raise ValueError(f"bad selector {sel!r}")
        if kind == "users":
            return Selector(text, kind, users=self.users(value))
        if kind == "tag":
            if not isinstance(value, str):
                raise ValueError(f"bad tag in {sel!r}")
            return Selector(text, kind, tag=value)
        if kind == "prefix":
            return Selector(text, kind, prefix=self.prefix(value))
        if kind == "idp_group":
            if not isinstance(value, str):
                raise UnreadablePolicy(f"idp_group selector {text!r} without a group name")
            return Selector(text, kind, group=value)
        return Selector(text, kind)

    def users(self, users: list) -> frozenset[str]:
        key = tuple(users)
        if key not in self._users:
            if not all(isinstance(u, str) for u in key):
                raise ValueError(f"bad user list {users!r}")
            self._users[key] = frozenset(key)
        return self._users[key]

    def prefix(self, text: str):
        if text not in self._prefixes:
            self._prefixes[text] = ipaddress.ip_network(text)
        return self._prefixes[text]

    @staticmethod
    def port_range(r: list) -> PortRange:
        first, last = r
        if not (isinstance(first, int) and isinstance(last, int) and 0 <= first <= last <= 65535):
            raise ValueError(f"bad port range {r!r}")
        return PortRange(first, last)
