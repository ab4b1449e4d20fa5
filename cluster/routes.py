"""Subnet routes and exit nodes: which advertised routes are approved, and which router of
a set serving the same CIDR is its primary.

Both are replicated decisions, taken in the state machine's apply (`settle`, called after
every command's handler) from the staged state alone, so every replica takes the same one.

- Auto-approval: the policy's `autoApprovers` (Tailscale's syntax, resolved by the parser
  into `{"routes": [[cidr, [approver, ...]], ...], "exitNode": [approver, ...]}`, approvers
  being `user:<name>`, `tag:<tag>`, `autogroup:member` or `autogroup:tagged`) approves an advertised route when
  the node's owner or one of its tags is listed for that CIDR or a CIDR containing it.
- Primary election: a CIDR approved on several routers has one primary, the only router
  whose WireGuard peer carries it in AllowedIPs (two peers cannot share an allowed IP): the
  others keep it in their record's `standby_routes`, which netmaps leave out.
  The primary stays while it is eligible (online, in the mesh, its subnet reachable);
  otherwise the eligible router with the lowest id takes over. No eligible router: the
  primary stays where it was, so a flapping set never moves it back and forth.

Exit routes (0.0.0.0/0, ::/0) are not elected: every approved exit node offers them and
each client picks one (agent/exit_node.py).
"""
from __future__ import annotations

import ipaddress
from typing import Any, Iterable

from raftmesh.proto.wire import EXIT_ROUTES

ROUTE_SETS = "route_sets"  # table: cidr -> {"cidr", "routers": [ids], "primary": id | None}
ROUTERS = "node_routes"  # table: node id -> the CIDRs it offers (`offered`), routers only


class RouteError(ValueError):
    """A route that is not a CIDR; the message names it."""


def canonical_routes(routes: Iterable[Any]) -> list[str]:
    """Routes as canonical CIDR text, sorted and distinct; host bits are refused (a route
    "10.0.0.1/24" is most likely a typo for an address or for 10.0.0.0/24)."""
    out = set()
    for r in routes:
        try:
            if not isinstance(r, str) or "/" not in r:
                raise ValueError(r)
            out.add(str(ipaddress.ip_network(r, strict=True)))
        except ValueError:
            raise RouteError(f"{r!r} is not a CIDR such as 10.1.0.0/24 (host bits must be "
                             "zero)") from None
    return sorted(out)


def is_exit_route(cidr: str) -> bool:
    return cidr in EXIT_ROUTES


# -- auto-approval ---------------------------------------------------------------------------
def approver_tokens(node: dict) -> set[str]:
    """What an autoApprovers entry may name to approve this node's routes: its tags, or
    (untagged) its user."""
    if node.get("tags"):
        return {f"tag:{t.removeprefix('tag:')}" for t in node["tags"]} | {"autogroup:tagged"}
    user = node.get("user")
    return {f"user:{user}", "autogroup:member"} if user else set()


def auto_approved(node: dict, approvers: dict | None) -> list[str]:
    """The node's advertised routes that `approvers` (the compiled autoApprovers) approve."""
    if not approvers:
        return []
    tokens = approver_tokens(node)
    if not tokens:
        return []
    exit_ok = bool(tokens & set(approvers.get("exitNode") or ()))
    grants = [(ipaddress.ip_network(cidr), set(who)) for cidr, who in approvers.get("routes") or ()
              if tokens & set(who)]
    out = []
    for r in node.get("advertised_routes") or ():
        if is_exit_route(r):
            if exit_ok:
                out.append(r)
            continue
        net = ipaddress.ip_network(r)
        if any(net.version == g.version and net.subnet_of(g) for g, _ in grants):
            out.append(r)
    return out


# -- which node serves which route -----------------------------------------------------------
def offered(node: dict | None) -> set[str]:
    """Subnet routes (not exit routes) the node both advertises and is approved for."""
    if not node:
        return set()
    return {r for r in node.get("approved_routes") or ()
            if r in (node.get("advertised_routes") or ()) and not is_exit_route(r)}


def exit_routes(node: dict) -> list[str]:
    """The exit routes a node offers (advertised and approved)."""
    adv = node.get("advertised_routes") or ()
    return [r for r in node.get("approved_routes") or () if is_exit_route(r) and r in adv]


def eligible(node: dict | None, cidr: str) -> bool:
    """May this router be the primary for `cidr` now?"""
    return bool(node) and bool(node.get("online")) and bool(node.get("approved")) \
        and not node.get("expired") and not node.get("locked") \
        and cidr in offered(node) and cidr not in (node.get("unreachable_routes") or ())


def elect(current: str | None, routers: list[str], is_eligible) -> str | None:
    """The primary: `current` while it is eligible, else the lowest eligible id, else
    `current` if it still serves the route (nobody better), else the lowest router."""
    if current in routers and is_eligible(current):
        return current
    for r in sorted(routers):
        if is_eligible(r):
            return r
    if current in routers:
        return current
    return min(routers) if routers else None


# -- the replicated decision -----------------------------------------------------------------
def settle(txn: Any, audit) -> list[dict]:
    """After a command's handler: auto-approve what the policy approves and re-elect the
    primaries of every CIDR a changed node serves or served. Returns the node records this
    changed (besides the handler's own writes), for the netmap feed.

    `txn` is the command's StagedTxn (state_machine.py): its staged writes say which nodes
    changed. `audit(target, before, after)` records an auto-approval. Cheap for the bulk of
    node writes (presence of nodes that route nothing): one index lookup each, and the
    policy is read only for a node with a route waiting for approval."""
    written = [key for (table, key) in txn.writes if table == "nodes"]
    if ("meta", "policy_head") in txn.writes:  # a new policy may approve waiting routes
        written = [nid for nid, n in txn.items("nodes") if _waiting(n)]
    approvers: list = []  # read once, when first needed
    changed: dict[str, dict] = {}
    touched: dict[str, set[str]] = {}  # cidr -> the written nodes that offer or offered it
    for nid in written:
        node = txn.get("nodes", nid)
        if node is not None and _waiting(node):
            if not approvers:
                approvers.append(_auto_approvers(txn))
            wanted = set(node.get("approved_routes") or ()) | set(auto_approved(node, approvers[0]))
            if wanted != set(node.get("approved_routes") or ()):
                after = dict(node, approved_routes=sorted(wanted))
                txn.put("nodes", nid, after)
                audit(f"node:{nid}", node, after)
                changed[nid] = node = after
        was, now = set(txn.get(ROUTERS, nid) or ()), offered(node)
        if was != now:
            if now:
                txn.put(ROUTERS, nid, sorted(now))
            else:
                txn.delete(ROUTERS, nid)
        for cidr in was | now:
            touched.setdefault(cidr, set()).add(nid)
    for cidr in sorted(touched):
        _reelect(txn, cidr, touched[cidr], changed)
    return list(changed.values())


def _waiting(node: dict) -> bool:
    """Does the node advertise a route not approved yet?"""
    return not set(node.get("advertised_routes") or ()) <= set(node.get("approved_routes") or ())


def _auto_approvers(txn: Any) -> dict | None:
    head = txn.get("meta", "policy_head")
    if not head:
        return None
    record = txn.get("policy_versions", f"{head['version']:010d}") or {}
    return (record.get("compiled") or {}).get("autoApprovers")


def _reelect(txn: Any, cidr: str, touched: set[str], changed: dict[str, dict]) -> None:
    current = txn.get(ROUTE_SETS, cidr) or {"cidr": cidr, "routers": [], "primary": None}
    nodes: dict[str, dict | None] = {}

    def node(nid: str) -> dict | None:
        if nid not in nodes:
            nodes[nid] = txn.get("nodes", nid)
        return nodes[nid]

    candidates = set(current["routers"]) | touched
    routers = sorted(nid for nid in candidates if cidr in offered(node(nid)))
    primary = elect(current["primary"], routers, lambda nid: eligible(node(nid), cidr))
    record = {"cidr": cidr, "routers": routers, "primary": primary}
    if record != current:
        if routers:
            txn.put(ROUTE_SETS, cidr, record)
        else:
            txn.delete(ROUTE_SETS, cidr)
    for nid in candidates:
        n = node(nid)
        if n is None:
            continue
        standby = set(n.get("standby_routes") or ())
        if (cidr in standby) != (nid in routers and nid != primary):
            standby ^= {cidr}
            nodes[nid] = after = dict(n, standby_routes=sorted(standby))
            txn.put("nodes", nid, after)
            changed[nid] = after


def route_table(txn: Any) -> list[dict]:
    """Every CIDR some router serves, with its primary and candidates (the admin API)."""
    out = []
    for cidr, record in txn.items(ROUTE_SETS):
        out.append({"cidr": cidr, "primary": record["primary"], "candidates": [
            {"id": nid, "eligible": eligible(txn.get("nodes", nid), cidr)}
            for nid in record["routers"]]})
    exits: dict[str, list[str]] = {}
    for nid, node in txn.items("nodes"):
        for r in exit_routes(node):
            exits.setdefault(r, []).append(nid)
    for cidr in sorted(exits):
        out.append({"cidr": cidr, "primary": None, "exit_node": True, "candidates": [
            {"id": nid, "eligible": bool(txn.get("nodes", nid).get("online"))}
            for nid in exits[cidr]]})
    return out
