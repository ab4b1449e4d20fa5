"""The access policy: the HuJSON document users write, parsed into an immutable `Policy`.

The format is Tailscale's (groups, tagOwners, hosts, acls, grants, tests) so existing
policies port over; users are plain names or e-mail addresses (cluster/names.py; "alice@"
as written for Tailscale means "alice"). Sections and fields raftmesh does not enforce
(cluster/policy_syntax.py) are kept in the text and reported as `warnings`. Parsing is a
pure function of the text, so every replica accepts or rejects a policy identically, and
every error names the offending field ("acls[2].dst[0]") because an operator has to find
it in a long document.

Selectors keep the policy's meaning in one place: `Selector.matches_node` and
`Selector.node_prefixes` are what netmaps are computed from, `Policy.allows` is what the
policy's `tests` are checked with.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any, Union

from raftmesh.cluster import hujson
from raftmesh.cluster.names import is_user_name
from raftmesh.cluster.policy_syntax import (ACL_KEYS, AUTO_APPROVER_KEYS, ENFORCED_AUTOGROUPS,
                                            ENFORCED_PROTOCOLS, GRANT_KEYS, INTERNET,
                                            PORTED_PROTOCOLS, ROLE_AUTOGROUPS, TEST_KEYS, TOP_KEYS,
                                            UNENFORCED_ENTRY_KEYS, UNENFORCED_SECTIONS, is_number,
                                            protocol)
from raftmesh.proto.wire import PortRange

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

TAG_RE = re.compile(r"^tag:[a-z0-9][a-z0-9-]{0,62}$")  # the admin API's tags
GROUP_RE = re.compile(r"^group:[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
CAPABILITY_RE = re.compile(r"^[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+/\S+$")  # grants' app keys
HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
NODE_KINDS = ("users", "member", "tagged", "tag", "idp_group")  # selectors listing a node's own addresses
IDP_GROUP_PREFIX = "group:idp/"  # a group of the identity provider (SCIM or the groups claim)
IDP_GROUP_RE = re.compile(r"^group:idp/[^\s\x00-\x1f]{1,256}$")
# Limits (docs/api.md): what one replica parses, stores and compiles netmaps from must stay
# bounded, since any caller with a read key can ask for a validation.
MAX_POLICY_BYTES = 1 << 20  # of UTF-8 text
MAX_ENTRIES = {"acls": 20_000, "grants": 20_000, "tests": 1_000, "groups": 5_000,
               "tagOwners": 5_000, "hosts": 5_000}
MAX_WARNINGS = 100  # then one "warnings_truncated": a long file repeats the same few


class PolicyError(ValueError):
    """A rejected policy; `errors` is [{"path": "acls[2].dst[0]", "message": ...}, ...]."""

    def __init__(self, errors: list[dict[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{e['path']}: {e['message']}" for e in errors[:10]))


class PolicyTooLarge(PolicyError):
    """The text exceeds MAX_POLICY_BYTES (the API answers 413, not 400)."""


@dataclass(frozen=True)
class NodeView:
    """What the policy may look at of a node. A tagged node belongs to no user."""

    user: str | None
    tags: frozenset[str]
    addresses: tuple[Network, ...]  # its own /32 and /128
    routes: tuple[Network, ...] = ()  # approved subnet routes
    groups: frozenset[str] = frozenset()  # its user's identity-provider groups, lower-cased
    exit_routes: tuple[Network, ...] = ()  # 0.0.0.0/0 and ::/0 as an exit node offers them

    # Derived once per view, not fields (equality ignores them): a policy change matches and
    # formats every node's addresses again, and ipaddress comparisons and IPv6 formatting
    # were most of that work at 10,000 nodes.
    @cached_property
    def address_texts(self) -> tuple[str, ...]:
        return tuple(str(a) for a in self.addresses)

    @cached_property
    def address_spans(self) -> tuple[tuple[int, int, int], ...]:
        return tuple(span(a) for a in self.addresses)

    @cached_property
    def owner(self) -> str | None:
        """The user whose device this is, None for tagged or ownerless nodes."""
        return None if self.tags else self.user


@dataclass(frozen=True)
class Selector:
    """One src/dst entry: `*`, a user or group (`users`), a tag, an autogroup or a prefix."""

    text: str
    kind: str  # any | users | member | tagged | tag | self | prefix | idp_group | internet
    users: frozenset[str] = frozenset()
    tag: str | None = None
    prefix: Network | None = None
    group: str | None = None  # idp_group: resolved per node from replicated membership

    def matches_node(self, node: NodeView) -> bool:
        """Is `node` covered as a *source*? A prefix covers the node's addresses and its
        subnet routes (traffic from a routed subnet enters the mesh through the router)."""
        k = self.kind
        if k == "any":
            return True
        if k == "users":
            return node.owner in self.users
        if k == "member":
            return node.owner is not None
        if k == "tagged":
            return bool(node.tags)
        if k == "tag":
            return self.tag in node.tags
        if k == "idp_group":
            return node.owner is not None and self.group in node.groups
        if k == "prefix":
            within = self.prefix_span
            return any(_span_within(a, within) for a in node.address_spans) \
                or any(_overlap(r, self.prefix) for r in node.routes)
        return False  # autogroup:self depends on the source; see netmap.py

    def node_prefixes(self, node: NodeView) -> list[Network]:
        """Which of `node`'s prefixes this selector targets as a *destination*. Only `*` and
        prefixes reach subnet routes: `tag:router:*` means the router, not its subnets; only
        autogroup:internet reaches the internet through an exit node."""
        if self.kind == "internet":
            return list(node.exit_routes)
        if self.kind == "any":
            return [*node.addresses, *node.routes]
        if self.kind == "prefix":
            within = self.prefix_span
            return [a for a, span_a in zip(node.addresses, node.address_spans)
                    if _span_within(span_a, within)] + [
                _overlap(r, self.prefix) for r in node.routes if _overlap(r, self.prefix)]
        if self.kind in NODE_KINDS and self.matches_node(node):
            return list(node.addresses)
        return []

    def routes_named(self, node: NodeView) -> tuple[Network, ...]:
        """The routes of `node` (subnet or exit) this selector names, on either side: the
        traffic it allows to or from them crosses `node`, so only the nodes on the ACL's
        other side route them through it (netmap.py)."""
        if self.kind == "any":
            return node.routes
        if self.kind == "prefix":
            return tuple(r for r in node.routes if _overlap(r, self.prefix))
        if self.kind == "internet":
            return node.exit_routes
        return ()

    @cached_property
    def prefix_span(self) -> tuple[int, int, int]:
        return span(self.prefix)


@dataclass(frozen=True)
class DstEntry:
    selector: Selector
    ports: tuple[PortRange, ...]


@dataclass(frozen=True)
class Acl:
    """An accept rule. `protos` empty means tcp, udp and icmp."""

    src: tuple[Selector, ...]
    dst: tuple[DstEntry, ...]
    protos: tuple[str, ...] = ()

    @property
    def src_any(self) -> bool:
        return any(s.kind == "any" for s in self.src)

    @property
    def src_prefixes(self) -> tuple[str, ...]:
        """The raw CIDRs written in src (hosts and IPs), as packet-filter sources."""
        return tuple(sorted({str(s.prefix) for s in self.src if s.kind == "prefix"}))


@dataclass(frozen=True)
class Identity:
    """A test's endpoint: a user's device, a tagged device, an address/prefix, or (as a
    destination) the internet through an exit node."""

    kind: str  # user | tag | prefix | internet
    value: str
    prefix: Network | None = None


@dataclass(frozen=True)
class PolicyTest:
    src: Identity
    proto: str
    accept: tuple[tuple[Identity, int], ...]
    deny: tuple[tuple[Identity, int], ...]
    # where it is written (tests not checked, and one test per group member, shift indexes)
    path: str = "tests[0]"


@dataclass(frozen=True)
class Policy:
    """A validated policy. `Policy()` is the empty policy, which denies everything."""

    groups: dict[str, frozenset[str]] = field(default_factory=dict)
    tag_owners: dict[str, frozenset[str]] = field(default_factory=dict)  # tag -> users
    hosts: dict[str, Network] = field(default_factory=dict)
    acls: tuple[Acl, ...] = ()
    tests: tuple[PolicyTest, ...] = ()
    # autoApprovers, resolved (cluster/routes.py): {"routes": [[cidr, [approver, ...]]],
    # "exitNode": [approver, ...]}; the state machine reads it from the compiled form.
    auto_approvers: dict = field(default_factory=dict)
    # What the text holds that raftmesh does not enforce: [{"code", "path", "message"}].
    # Not part of the meaning (equality, the compiled form): it describes the text.
    warnings: tuple[dict[str, str], ...] = field(default=(), compare=False)

    def tag_owners_allow(self, actor_user: str | None, tag: str, is_admin: bool) -> bool:
        """May this actor put `tag` on a node? Only tags declared in tagOwners exist; an
        admin may assign any of them, a user only those listing them (or their group)."""
        if tag not in self.tag_owners:
            return False
        if is_admin:
            return True
        return actor_user is not None and actor_user.rstrip("@") in self.tag_owners[tag]

    def allows(self, src: Identity, dst: Identity, port: int, proto: str = "tcp") -> bool:
        """Does some ACL accept `proto` traffic from `src` to `dst:port`? Users and tags
        stand for their devices, whose addresses are unknown here, so they never match
        prefix selectors (and addresses never match user or tag selectors)."""
        for acl in self.acls:
            if acl.protos and proto not in acl.protos:
                continue
            if not any(_identity_matches(s, src, None) for s in acl.src):
                continue
            for entry in acl.dst:
                if (proto == "icmp" or any(r.first <= port <= r.last for r in entry.ports)) \
                        and _identity_matches(entry.selector, dst, src):
                    return True
        return False

    def check(self, src: str, dst: str, proto: str = "tcp") -> bool:
        """`allows` for text as written in a test: check("alice", "tag:db:5432")."""
        p = _Parser(self.groups, self.tag_owners, self.hosts)
        s = p.identity(src, "src")
        d = p.test_dst(dst, "dst")
        if p.errors:
            raise PolicyError(p.errors)
        return self.allows(s, d[0], d[1], proto)


def parse_policy(text: str) -> Policy:
    """Parse and validate a HuJSON policy; raise PolicyError listing every problem found,
    including failing `tests` (a policy whose own tests fail is never accepted)."""
    size = len(text.encode())
    if size > MAX_POLICY_BYTES:
        raise PolicyTooLarge([{"path": "$", "message": f"the policy is {size} bytes; the limit "
                                                       f"is {MAX_POLICY_BYTES}"}])
    try:
        doc = hujson.loads(text)
    except hujson.HuJSONError as e:
        raise PolicyError([{"path": "$", "message": f"not valid HuJSON: {e}"}]) from None
    if not isinstance(doc, dict):
        raise PolicyError([{"path": "$", "message": "the policy must be an object"}])
    too_many = [{"path": key, "message": f"{len(doc[key])} entries; the limit is {limit}"}
                for key, limit in MAX_ENTRIES.items()
                if isinstance(doc.get(key), (list, dict)) and len(doc[key]) > limit]
    if too_many:
        raise PolicyError(too_many)
    p = _Parser()
    for key in doc:
        if key not in TOP_KEYS:
            p.err(str(key), f"unknown key; expected one of {', '.join(TOP_KEYS)}")
        elif key in UNENFORCED_SECTIONS:
            p.parse_unenforced(key, doc[key])
    p.default_posture = bool(doc.get("defaultSrcPosture"))
    p.ipsets = doc.get("ipsets") if isinstance(doc.get("ipsets"), dict) else {}
    p.groups = p.parse_groups(doc.get("groups", {}))
    p.tag_owners = p.parse_tag_owners(doc.get("tagOwners", {}))
    p.hosts = p.parse_hosts(doc.get("hosts", {}))
    acls = p.parse_list(doc.get("acls", []), "acls", p.parse_acl)
    grants = p.parse_list(doc.get("grants", []), "grants", p.parse_grant)
    tests = p.parse_list(doc.get("tests", []), "tests", p.parse_test)
    tests = [t for per_src in tests for t in per_src]
    auto_approvers = p.parse_auto_approvers(doc.get("autoApprovers", {}))
    if p.errors:
        raise PolicyError(p.errors)
    policy = Policy(p.groups, p.tag_owners, p.hosts,
                    tuple(acls) + tuple(a for rules in grants for a in rules), tuple(tests),
                    auto_approvers, tuple(p.warnings))
    failures = run_tests(policy)
    if failures:
        raise PolicyError(failures)
    return policy


def run_tests(policy: Policy) -> list[dict[str, str]]:
    """The policy's `tests` that fail, as PolicyError entries naming each test."""
    errors = []
    for t in policy.tests:
        for want, cases in (("accept", t.accept), ("deny", t.deny)):
            for j, (dst, port) in enumerate(cases):
                if policy.allows(t.src, dst, port, t.proto) != (want == "accept"):
                    verb = "denied" if want == "accept" else "accepted"
                    errors.append({"path": f"{t.path}.{want}[{j}]", "message":
                                   f"{t.src.value} -> {dst.value}:{port} ({t.proto}) is {verb} "
                                   f"by the policy but the test expects {want}"})
    return errors


# -- matching helpers ----------------------------------------------------------------------
def span(n: Network) -> tuple[int, int, int]:
    """(IP version, first address, last address) as integers: `a` lies within `b` when the
    versions match and a's range is inside b's, without ipaddress's object comparisons."""
    return n.version, int(n.network_address), int(n.broadcast_address)


def _span_within(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    return a[0] == b[0] and b[1] <= a[1] and a[2] <= b[2]


def _within(a: Network, b: Network) -> bool:
    return a.version == b.version and a.subnet_of(b)


def _overlap(a: Network, b: Network) -> Network | None:
    """The intersection of two prefixes (the smaller one), or None."""
    if a.version != b.version or not a.overlaps(b):
        return None
    return a if a.prefixlen >= b.prefixlen else b


def _identity_matches(sel: Selector, ident: Identity, src: Identity | None) -> bool:
    k = sel.kind
    if ident.kind == "internet" or k == "internet":  # only autogroup:internet reaches it
        return ident.kind == k
    if k == "any":
        return True
    if k == "users":
        return ident.kind == "user" and ident.value in sel.users
    if k == "member":
        return ident.kind == "user"
    if k == "tagged":
        return ident.kind == "tag"
    if k == "tag":
        return ident.kind == "tag" and ident.value == sel.tag
    if k == "prefix":
        return ident.kind == "prefix" and _within(ident.prefix, sel.prefix)
    return k == "self" and src is not None and src.kind == ident.kind == "user" \
        and src.value == ident.value


# -- parsing -------------------------------------------------------------------------------
_TYPE_NAMES = {list: "a list", dict: "an object", bool: "true or false"}


class _Parser:
    """Collects every error instead of stopping at the first: one round trip per fix."""

    def __init__(self, groups=None, tag_owners=None, hosts=None):
        self.errors: list[dict[str, str]] = []
        self.warnings: list[dict[str, str]] = []
        self.groups: dict[str, frozenset[str]] = groups or {}
        self.tag_owners: dict[str, frozenset[str]] = tag_owners or {}
        self.hosts: dict[str, Network] = hosts or {}
        self.ipsets: dict = {}
        self.default_posture = False  # defaultSrcPosture applies to rules without their own

    def err(self, path: str, message: str) -> None:
        self.errors.append({"path": path, "message": message})

    def warn(self, code: str, path: str, message: str) -> None:
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append({"code": code, "path": path, "message": message})
        elif len(self.warnings) == MAX_WARNINGS:
            self.warnings.append({"code": "warnings_truncated", "path": "$", "message":
                                  f"only the first {MAX_WARNINGS} warnings are listed"})

    def parse_unenforced(self, key: str, value: Any) -> None:
        """A section raftmesh keeps but does not enforce: its shape is checked (a typo in
        a key is still an error) and, when it says anything, a warning names it."""
        kind, code, why = UNENFORCED_SECTIONS[key]
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            self.err(key, f"must be {_TYPE_NAMES[kind]}")
            return
        allowed = UNENFORCED_ENTRY_KEYS.get(key)
        for i, entry in enumerate(value if allowed else ()):
            if isinstance(entry, dict):
                self.known_keys(entry, f"{key}[{i}]", allowed)
            else:
                self.err(f"{key}[{i}]", "must be an object")
        if value:
            self.warn(code, key, why)

    def parse_auto_approvers(self, value: Any) -> dict:
        """autoApprovers resolved to what cluster/routes.py matches nodes against: groups
        expanded into `user:<name>`, tags kept (declared in tagOwners), routes canonical."""
        if not isinstance(value, dict):
            self.err("autoApprovers", "must be an object")
            return {}
        self.known_keys(value, "autoApprovers", AUTO_APPROVER_KEYS)
        out: dict = {}
        routes = value.get("routes", {})
        if not isinstance(routes, dict):
            self.err("autoApprovers.routes", "must be an object of CIDR: [approvers]")
            routes = {}
        resolved = []
        for cidr, who in routes.items():
            path = f"autoApprovers.routes.{cidr}"
            net = _network(cidr)
            if net is None or "/" not in cidr:
                self.err(path, f"{cidr!r} is not a CIDR")
                continue
            resolved.append([str(net), self.approvers(who, path)])
        if resolved:
            out["routes"] = sorted(resolved)
        if "exitNode" in value:
            out["exitNode"] = self.approvers(value["exitNode"], "autoApprovers.exitNode")
        if value.get("services"):
            self.warn("auto_approvers_not_enforced", "autoApprovers.services",
                      "service auto approvers are kept but not applied: raftmesh has no services")
        return out

    def approvers(self, value: Any, path: str) -> list[str]:
        out: set[str] = set()
        for p, a in self.strings(value, path):
            if a.startswith("group:"):
                if a not in self.groups:
                    self.err(p, f"unknown group {a!r}")
                out.update(f"user:{u}" for u in self.groups.get(a, ()))
            elif a.startswith("tag:"):
                if a not in self.tag_owners:
                    self.err(p, f"unknown tag {a!r}; declare it in tagOwners")
                out.add(a)
            elif a in ("autogroup:member", "autogroup:tagged"):
                out.add(a)
            elif a.startswith("autogroup:"):
                self.err(p, f"only users, groups, tags, autogroup:member and autogroup:tagged "
                            f"approve routes, not {a!r}")
            elif (u := self.user(a.removeprefix("user:"), p)) is not None:
                out.add(f"user:{u}")
        return sorted(out)

    def parse_list(self, value: Any, path: str, parse_item) -> list:
        if not isinstance(value, list):
            self.err(path, "must be a list")
            return []
        items = [parse_item(item, f"{path}[{i}]") for i, item in enumerate(value)]
        return [x for x in items if x is not None]

    def strings(self, value: Any, path: str, allow_empty: bool = True) -> list[tuple[str, str]]:
        """(path, string) pairs of a list of strings, reporting non-strings."""
        if not isinstance(value, list):
            self.err(path, "must be a list of strings")
            return []
        if not value and not allow_empty:
            self.err(path, "must not be empty")
        out = []
        for i, s in enumerate(value):
            if isinstance(s, str):
                out.append((f"{path}[{i}]", s))
            else:
                self.err(f"{path}[{i}]", "must be a string")
        return out

    def user(self, text: str, path: str) -> str | None:
        name = text[:-1] if text.endswith("@") else text
        if not is_user_name(name):
            self.err(path, f"{text!r} is not a valid user name")
            return None
        return name

    def parse_groups(self, value: Any) -> dict[str, frozenset[str]]:
        if not isinstance(value, dict):
            self.err("groups", "must be an object")
            return {}
        groups = {}
        for name, members in value.items():
            path = f"groups.{name}"
            if not GROUP_RE.match(name):
                self.err(path, f"group names look like 'group:eng', not {name!r}")
                continue
            users = set()
            for p, m in self.strings(members, path):
                if m.startswith(("group:", "tag:", "autogroup:")):
                    self.err(p, f"groups contain only users, not {m!r}")
                elif (u := self.user(m, p)) is not None:
                    users.add(u)
            groups[name] = frozenset(users)
        return groups

    def parse_tag_owners(self, value: Any) -> dict[str, frozenset[str]]:
        if not isinstance(value, dict):
            self.err("tagOwners", "must be an object")
            return {}
        owners: dict[str, frozenset[str]] = {}
        for tag, entries in value.items():
            path = f"tagOwners.{tag}"
            if not TAG_RE.match(tag):
                self.err(path, f"tags look like 'tag:web' (lowercase, digits, '-'), not {tag!r}")
                continue
            users: set[str] = set()
            for p, o in self.strings(entries, path):
                if o.startswith("group:"):
                    if o in self.groups:
                        users |= self.groups[o]
                    else:
                        self.err(p, f"unknown group {o!r}")
                elif o.startswith("tag:"):  # a tag may own tags; it grants no user anything
                    if o not in value:
                        self.err(p, f"unknown tag {o!r}; declare it in tagOwners")
                elif o.startswith("autogroup:"):
                    if o != "autogroup:admin":
                        self.err(p, f"only autogroup:admin may own tags, not {o!r}")
                elif (u := self.user(o, p)) is not None:
                    users.add(u)
            owners[tag] = frozenset(users)
        return owners

    def parse_hosts(self, value: Any) -> dict[str, Network]:
        if not isinstance(value, dict):
            self.err("hosts", "must be an object")
            return {}
        hosts = {}
        for name, addr in value.items():
            path = f"hosts.{name}"
            if not HOST_RE.match(name) or _network(name) is not None:
                self.err(path, f"{name!r} is not a valid host name")
            elif not isinstance(addr, str):
                self.err(path, "must be an IP address or CIDR string")
            elif (net := self.network(addr, path)) is not None:
                hosts[name] = net
        return hosts

    def network(self, text: str, path: str) -> Network | None:
        """An address or prefix; host bits are allowed ("10.20.10.1/29" names 10.20.10.0/29,
        as in Tailscale and Headscale)."""
        net = _network(text)
        if net is None:
            self.err(path, f"{text!r} is not an IP or CIDR")
        return net

    def selector(self, text: str, path: str, side: str) -> Selector | None:
        """The selector `text` names; None when it is an error (reported) or names what
        raftmesh does not enforce (warned about): either way it matches nothing."""
        if text == "*":
            return Selector(text, "any")
        if text.startswith("autogroup:"):
            return self.autogroup(text, path, side)
        if text.startswith("ipset:"):
            if text not in self.ipsets and text.removeprefix("ipset:") not in self.ipsets:
                self.err(path, f"unknown IP set {text!r}; declare it in ipsets")
            else:
                self.warn("ipsets_not_enforced", path, f"{text} is not resolved: it matches "
                                                       "nothing here")
            return None
        if text.startswith("user:"):  # Tailscale's explicit form of a user
            name = text.removeprefix("user:")
            if name.startswith("*@"):
                self.warn("user_wildcard_not_enforced", path, f"{text} (every user of a domain) "
                          "is not enforced yet: it matches nothing")
            elif self.user(name, path) is not None:
                return Selector(text, "users", users=frozenset({name.removesuffix("@")}))
            return None
        if text.startswith(IDP_GROUP_PREFIX):
            if not IDP_GROUP_RE.match(text):
                self.err(path, f"{text!r}: an identity provider's group is group:idp/<name>")
                return None
            return Selector(text, "idp_group", group=text[len(IDP_GROUP_PREFIX):].lower())
        if text.startswith("group:"):
            if text not in self.groups:
                self.err(path, f"unknown group {text!r}")
                return None
            return Selector(text, "users", users=self.groups[text])
        if text.startswith("tag:"):
            if text not in self.tag_owners:
                self.err(path, f"unknown tag {text!r}; declare it in tagOwners")
                return None
            return Selector(text, "tag", tag=text)
        if _network(text) is not None or "/" in text:
            net = self.network(text, path)
            return Selector(text, "prefix", prefix=net) if net else None
        if text in self.hosts:  # a host alias wins over a user of the same name
            return Selector(text, "prefix", prefix=self.hosts[text])
        if is_user_name(text.removesuffix("@")):
            return Selector(text, "users", users=frozenset({text.removesuffix("@")}))
        self.err(path, f"unknown {side} {text!r}: expected a user, group, tag, host, IP/CIDR, "
                       "autogroup or *")
        return None

    def autogroup(self, text: str, path: str, side: str) -> Selector | None:
        kind = ENFORCED_AUTOGROUPS.get(text)
        if kind == "self" and side == "src":
            self.err(path, "autogroup:self is only valid in dst")
        elif kind == "any" and side == "dst":
            self.err(path, f"{text} is only valid in src")
        elif kind is not None:
            return Selector(text, kind)
        elif text == INTERNET and side == "dst":
            return Selector(text, "internet")
        elif text == INTERNET:
            self.err(path, "autogroup:internet is only valid in dst")
        elif text in ROLE_AUTOGROUPS:
            self.warn("autogroup_not_enforced", path, f"{text} is not enforced: raftmesh users "
                      "have no roles and no shared devices, so it matches nothing")
        else:
            self.err(path, f"unknown autogroup {text!r}")
        return None

    def protocol(self, text: Any, path: str) -> str | None:
        """A protocol by name or IANA number, canonical ("6" -> "tcp"); None if invalid."""
        if isinstance(text, int) and not isinstance(text, bool):
            text = str(text)  # a JSON number, as Tailscale also reads it
        name = protocol(text) if isinstance(text, str) else None
        if name is None:
            self.err(path, f"{text!r} is not a protocol: use a name (tcp, udp, icmp, sctp, gre, "
                           "esp, ah, igmp, ipv6-icmp, ...) or an IANA number 1-255")
        return name

    def ports(self, text: str, path: str) -> tuple[PortRange, ...] | None:
        if text == "*":
            return (PortRange(),)
        out = set()
        for part in text.split(","):
            lo, dash, hi = part.partition("-")
            if not (is_number(lo) and (is_number(hi) or not dash)):
                self.err(path, f"bad ports {text!r}: use *, 22, 80,443 or 8000-8100")
                return None
            first, last = int(lo), int(hi or lo)
            if not first <= last <= 65535:
                self.err(path, f"bad port range {part!r}: ports are 0-65535, low to high")
                return None
            out.add(PortRange(first, last))
        return tuple(sorted(out))

    def known_keys(self, rule: dict, path: str, keys: tuple[str, ...]) -> None:
        for key in rule:
            if key not in keys:
                self.err(f"{path}.{key}", f"unknown key; expected one of {', '.join(keys)}")

    def field_name(self, rule: dict, path: str, name: str, legacy: str) -> str:
        """Which of a field's names the rule uses (Tailscale still reads `users` for `src`
        and `ports` for `dst` in acls); both at once is an error."""
        if legacy in rule and name in rule:
            self.err(f"{path}.{legacy}", f"is the legacy name of {name}: give only {name}")
        return legacy if legacy in rule and name not in rule else name

    def needs_posture(self, rule: dict, path: str) -> bool:
        """Does the rule require a device posture (its own srcPosture, or the policy's
        defaultSrcPosture)? raftmesh cannot check one, so such a rule grants nothing:
        ignoring the requirement would grant more than the file does."""
        posture = rule.get("srcPosture")
        if posture is not None and not (isinstance(posture, list)
                                        and all(isinstance(x, str) for x in posture)):
            self.err(f"{path}.srcPosture", "must be a list of posture names")
            return False
        if posture or (posture is None and self.default_posture):
            self.warn("src_posture_not_enforced", f"{path}.srcPosture" if posture else path,
                      "raftmesh cannot check device posture: this rule grants nothing")
            return True
        return False

    def self_sources(self, src: list, dst_selectors: list, path: str) -> None:
        if any(d and d.kind == "self" for d in dst_selectors):
            for i, s in enumerate(src):
                if s and s.kind not in ("any", "users", "member"):
                    self.err(f"{path}.src[{i}]", "with autogroup:self in dst, src may only hold "
                                                 "users, groups, autogroup:member or *")

    def enforced(self, proto: str | None, path: str) -> bool:
        if proto is None or proto in ENFORCED_PROTOCOLS:
            return True
        self.warn("proto_not_enforced", path, f"agents filter only {', '.join(ENFORCED_PROTOCOLS)}:"
                  f" {proto} traffic stays denied")
        return False

    def parse_acl(self, acl: Any, path: str) -> Acl | None:
        """An acls entry, or None when it is invalid or grants nothing raftmesh enforces."""
        if not isinstance(acl, dict):
            self.err(path, "must be an object")
            return None
        before = len(self.errors)
        self.known_keys(acl, path, ACL_KEYS)
        src_key = self.field_name(acl, path, "src", "users")
        dst_key = self.field_name(acl, path, "dst", "ports")
        for key in ("action", src_key, dst_key):
            if key not in acl:
                self.err(f"{path}.{key}", "is required")
        if "action" in acl and acl["action"] != "accept":
            self.err(f"{path}.action", f"must be 'accept' (deny is the default), not {acl['action']!r}")
        proto = self.protocol(acl["proto"], f"{path}.proto") if "proto" in acl else None
        posture = self.needs_posture(acl, path)
        # a missing src/dst is already reported; the placeholders avoid a second error
        src = [self.selector(s, p, "src") for p, s in
               self.strings(acl.get(src_key, ["*"]), f"{path}.{src_key}", allow_empty=False)]
        dst = []
        for p, d in self.strings(acl.get(dst_key, ["*:*"]), f"{path}.{dst_key}", allow_empty=False):
            host, colon, ports = d.rpartition(":")
            if not colon or not host:
                self.err(p, f"{d!r} must be host:ports, e.g. tag:web:443 or *:*")
                continue
            sel = self.selector(host.removeprefix("[").removesuffix("]"), p, "dst")
            pr = self.ports(ports, p)
            if pr and proto and proto not in PORTED_PROTOCOLS and pr != (PortRange(),):
                self.err(p, f"{proto} has no ports: use host:*")
            dst.append(DstEntry(sel, pr) if sel and pr else None)
        self.self_sources(src, [d and d.selector for d in dst], path)
        if len(self.errors) > before or posture or not self.enforced(proto, f"{path}.proto"):
            return None
        src, dst = [s for s in src if s], [d for d in dst if d]
        return Acl(tuple(src), tuple(dst), (proto,) if proto else ()) if src and dst else None

    def parse_grant(self, grant: Any, path: str) -> tuple[Acl, ...] | None:
        """A grants entry as the rules it amounts to, one per protocol it names in `ip`
        (ports-only entries and "*" mean tcp, udp and icmp, as in an acl without proto)."""
        if not isinstance(grant, dict):
            self.err(path, "must be an object")
            return None
        before = len(self.errors)
        self.known_keys(grant, path, GRANT_KEYS)
        for key in ("src", "dst"):
            if key not in grant:
                self.err(f"{path}.{key}", "is required")
        if not grant.get("ip") and not grant.get("app"):
            self.err(path, "a grant needs ip (network access) or app (application capabilities)")
        if "app" in grant:
            if not isinstance(grant["app"], dict):
                self.err(f"{path}.app", "must be an object")
            elif grant["app"]:
                for name in grant["app"]:
                    if not CAPABILITY_RE.match(name):
                        self.err(f"{path}.app.{name}", "capability names look like "
                                                       "example.com/cap/name")
                self.warn("grant_app_not_enforced", f"{path}.app", "application capabilities are "
                          "kept but not enforced")
        if "via" in grant:
            for p, via in self.strings(grant["via"], f"{path}.via"):
                if via not in self.tag_owners:
                    self.err(p, f"via names a router by tag declared in tagOwners, not {via!r}")
            self.warn("grant_via_not_enforced", f"{path}.via", "routing through via is not "
                      "enforced: this grant grants nothing")
        posture = self.needs_posture(grant, path)
        # (an empty src or dst is valid in a grant: it grants nothing)
        src = [self.selector(s, p, "src")
               for p, s in self.strings(grant.get("src", []), f"{path}.src")]
        dst = []
        for p, d in self.strings(grant.get("dst", []), f"{path}.dst"):
            if _network(d) is not None and _network(d).prefixlen == 0:
                self.err(p, f"{d!r} is every address: use * (the tailnet) or autogroup:internet")
            dst.append(self.selector(d, p, "dst"))
        ip: dict[str | None, tuple[str, set[PortRange]]] = {}
        for p, entry in self.strings(grant.get("ip", []), f"{path}.ip"):
            name, colon, ports = entry.rpartition(":")
            proto = self.protocol(name, p) if colon else None
            if colon and proto is None:
                continue
            pr = self.ports(ports, p)
            if pr and proto and proto not in PORTED_PROTOCOLS and pr != (PortRange(),):
                self.err(p, f"{proto} has no ports: use {name}:*")
            elif pr:
                ip.setdefault(proto, (p, set()))[1].update(pr)
        self.self_sources(src, dst, path)
        if len(self.errors) > before or posture or "via" in grant:
            return None
        src, dst = [s for s in src if s], [d for d in dst if d]
        return tuple(Acl(tuple(src), tuple(DstEntry(d, tuple(sorted(ranges))) for d in dst),
                         (proto,) if proto else ())
                     for proto, (p, ranges) in ip.items()
                     if self.enforced(proto, p) and src and dst)

    def identity(self, text: Any, path: str) -> Identity | None:
        if not isinstance(text, str):
            self.err(path, "must be a string")
            return None
        text = text.removeprefix("user:")
        if text.startswith(("group:", "autogroup:")) or text == "*":
            self.err(path, f"a test endpoint is a user, tag, host or IP, not {text!r}")
        elif text.startswith("tag:"):
            if text in self.tag_owners:
                return Identity("tag", text)
            self.err(path, f"unknown tag {text!r}; declare it in tagOwners")
        elif _network(text) is not None or "/" in text:
            if (net := self.network(text, path)) is not None:
                return Identity("prefix", text, net)
        elif text in self.hosts:
            return Identity("prefix", text, self.hosts[text])
        elif (u := self.user(text, path)) is not None:
            return Identity("user", u)
        return None

    def test_dst(self, text: str, path: str) -> tuple[Identity, int] | None:
        host, colon, port = text.rpartition(":")
        if not colon or not host or not is_number(port) or int(port) > 65535:
            self.err(path, f"{text!r} must be host:port with one port, e.g. tag:db:5432")
            return None
        # the internet through exit nodes, written as in dst: autogroup:internet:443
        ident = Identity("internet", INTERNET) if host == INTERNET else \
            self.identity(host.removeprefix("[").removesuffix("]"), path)
        return (ident, int(port)) if ident else None

    def test_sources(self, text: Any, path: str) -> list[Identity] | None:
        """A test's src: an endpoint, or a group, tested as each of its users."""
        if isinstance(text, str) and text.startswith("group:"):
            if text in self.groups:
                return [Identity("user", u) for u in sorted(self.groups[text])]
            self.err(path, f"unknown group {text!r}")
            return None
        ident = self.identity(text, path)
        return None if ident is None else [ident]

    def parse_test(self, test: Any, path: str) -> tuple[PolicyTest, ...] | None:
        if not isinstance(test, dict):
            self.err(path, "must be an object")
            return None
        before = len(self.errors)
        self.known_keys(test, path, TEST_KEYS)
        if "src" not in test:
            self.err(f"{path}.src", "is required")
        srcs = self.test_sources(test.get("src"), f"{path}.src") if "src" in test else None
        proto = self.protocol(test.get("proto", "tcp"), f"{path}.proto")
        cases = {}
        for key in ("accept", "deny"):
            cases[key] = tuple(c for p, d in self.strings(test.get(key, []), f"{path}.{key}")
                               if (c := self.test_dst(d, p)) is not None)
        if len(self.errors) > before:
            return None
        if test.get("srcPostureAttrs") or proto not in ENFORCED_PROTOCOLS:
            why = "device posture" if test.get("srcPostureAttrs") else f"{proto} traffic"
            self.warn("test_not_checked", path, f"raftmesh does not enforce {why}, so this "
                                                "test is kept but not checked")
            return None
        return tuple(PolicyTest(src, proto, cases["accept"], cases["deny"], path) for src in srcs)


@lru_cache(maxsize=4096)
def _network(text: str) -> Network | None:
    """Is `text` an address or prefix? Asked of every selector; a large policy repeats a few
    hundred, and ipaddress's failed parse of "alice" or "group:eng" was half its parse."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
