"""The chaos checks: each takes plain data (a history, final tables, digests) and returns a
`Check` that says ok or not and carries the evidence a reader needs.

Pure functions, so each can be tested on hand-made inputs. The final state is read from a
replica's LMDB after the cluster settled and stopped (`read_tables`).

- linearizable:   WGL per key (chaos/linearizability.py) over the history plus one final
                  read per key taken from the final state.
- acknowledged:   no acknowledged write is lost: the final value of every key is the effect
                  of a write that could have been the last one (a simpler, direct statement
                  of what the linearizability check also implies, with pointed evidence).
- attributable:   nothing exists that no operation can explain: an unknown-outcome op may
                  be present or absent, but a phantom object is a bug.
- atomic:         never half applied: references between tables hold, the audit chain
                  verifies and folding its before/after records reproduces the tables.
- converged:      every replica ends at the same state version with the same LMDB digest
                  and the same Raft membership.
- responses:      no replica gave an answer this workload can never legitimately get (500s).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

from raftmesh.storage.audit_chain import verify as verify_chain

from . import linearizability
from .history import FAIL, OK, UNKNOWN, Operation
from .models import ExistenceModel, RegisterModel, freeze

EFFECT = {"create": True, "delete": False}  # existence ops; register writes set op.value
TABLE_OF_TARGET = {"user": "users", "preauth_key": "preauth_keys", "node": "nodes",
                   "api_key": "api_keys", "member": "members", "cluster_key": "cluster_keys"}
SECRET_FIELDS = ("hash", "private_key")
# Node presence (stream online/offline) is deliberately not audited (state_machine.py).
UNAUDITED_NODE_FIELDS = ("online", "stream_replica", "stream_session", "last_seen")
MAX_EVIDENCE = 20


@dataclass
class Check:
    name: str
    ok: bool
    summary: str
    evidence: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "ok": self.ok, "summary": self.summary, "evidence": self.evidence}

    def render(self) -> str:
        head = f"[{'PASS' if self.ok else 'FAIL'}] {self.name}: {self.summary}"
        return "\n".join([head] + [f"    {line}" for e in self.evidence[:MAX_EVIDENCE]
                                   for line in e.splitlines()])


def model_for(key: str):
    return RegisterModel() if key == "policy" else ExistenceModel()


# -- final state -----------------------------------------------------------------------------
def read_tables(state_dir: str) -> tuple[tuple[int, str], dict[str, dict[str, Any]]]:
    """((version, digest), {table: {key: value}}) of a stopped replica's LMDB."""
    from raftmesh.storage.state_store import TABLES, StateStore
    store = StateStore(state_dir)
    try:
        digest = store.digest()
        with store.read() as txn:
            tables = {t: dict(txn.items(t)) for t in TABLES}
    finally:
        store.close_unsynced()
    return digest, tables


def final_states(state_dirs: dict[str, str], current: Iterable[str], log=print) -> tuple[dict, dict | None]:
    """Every replica's (version, digest) (None: unreadable), and the tables of the first
    current member that can be read: the final state the history is checked against. Not
    a replica left removed: it may be empty (chaos seed 7: 27 keys looked non-linearizable)."""
    digests, tables = {}, None
    for rid, state_dir in state_dirs.items():
        try:
            digests[rid], t = read_tables(state_dir)
        except Exception as e:  # lmdb.Error, OSError: evidence, not a crash
            digests[rid] = None
            log(f"cannot read {rid}'s state: {e!r}")
            continue
        if tables is None and rid in current:
            tables = t
    return digests, tables


def final_values(tables: dict, history: list[Operation], user_pool: Iterable[str],
                 owners: Iterable[str], setup_key_ids: set[str]) -> dict[str, Any]:
    """The value each history key has in the final state, as a read would have seen it."""
    from .workload import policy_marker
    owners = set(owners)
    final: dict[str, Any] = {f"user:{n}": n in tables["users"] for n in user_pool}
    head = tables["meta"].get("policy_head")
    record = tables["policy_versions"].get(f"{head['version']:010d}") if head else None
    final["policy"] = policy_marker(record["text"]) if record else None
    keys = {k for k, v in tables["preauth_keys"].items() if v["user"] in owners and k not in setup_key_ids}
    machines = {n["machine_key"] for n in tables["nodes"].values()}
    for op in history:
        if op.key.startswith("pak:"):
            final[op.key] = op.key[4:] in keys
        elif op.key.startswith("node:"):
            final[op.key] = op.key[5:] in machines
    for k in keys:
        final.setdefault(f"pak:{k}", True)
    for m in machines:
        final.setdefault(f"node:{m}", True)
    return final


def final_reads(final: dict[str, Any], history: list[Operation]) -> list[Operation]:
    """One read per key after every op: the state every replica converged to."""
    t = max([op.invoke for op in history] + [op.complete for op in history if op.complete is not None],
            default=0.0) + 1.0
    return [Operation(process="final", op_id=f"final:{k}", key=k, f="read", value=None, invoke=t,
                      complete=t, status=OK, result=v) for k, v in sorted(final.items())]


# -- attribution of unknown creates --------------------------------------------------------
def attribute(history: list[Operation], final: dict[str, Any], tables: dict,
              user_pool: Iterable[str], owners: Iterable[str], setup_key_ids: set[str],
              known_machines: Iterable[str] = ()) -> tuple[Check, list[Operation]]:
    """Every object in the final state must come from some op of the history.

    Pre-auth keys get their id from the server, so an unknown-outcome create does not know
    which key it made: each unexplained key is charged to an unknown create of the same
    owner (at most one key each). Returns the check and, for the WGL search, a synthetic
    unknown create per charged key invoked at its owner's earliest unknown create (any of
    them could be the one, so the earliest is the weakest sound assumption).
    """
    pool, owners = set(user_pool), set(owners)
    evidence, extra = [], []
    for name in tables["users"]:
        if name not in pool and name not in owners:
            evidence.append(f"user {name!r} exists but no operation ever created it")
    seen_keys = {op.key for op in history} | {f"node:{m}" for m in known_machines}
    for m, node_key in ((n["machine_key"], nid) for nid, n in tables["nodes"].items()):
        if f"node:{m}" not in seen_keys:
            evidence.append(f"node {node_key} (machine {m[:12]}...) exists but no registration used that machine key")
    unknown_creates = defaultdict(list)
    for op in history:
        if op.key.startswith("pak?:") and op.status == UNKNOWN:
            unknown_creates[op.key[5:]].append(op)
    unexplained = defaultdict(list)
    for kid, key in tables["preauth_keys"].items():
        if kid in setup_key_ids or f"pak:{kid}" in seen_keys:
            continue
        if key["user"] not in owners:
            evidence.append(f"pre-auth key {kid} of user {key['user']!r} exists but the workload never made one for that user")
            continue
        unexplained[key["user"]].append(kid)
    for owner, kids in sorted(unexplained.items()):
        creates = unknown_creates.get(owner, [])
        if len(kids) > len(creates):
            evidence.append(f"{len(kids)} pre-auth key(s) of {owner} with ids no acknowledged create returned "
                            f"({', '.join(sorted(kids))}) but only {len(creates)} create(s) had an unknown outcome")
        start = min((op.invoke for op in creates), default=0.0)
        for kid in kids:
            extra.append(Operation(process="attributed", op_id=f"attributed:{kid}", key=f"pak:{kid}",
                                   f="create", value=owner, invoke=start, complete=None, status=UNKNOWN))
    n_unknown = sum(op.status == UNKNOWN for op in history)
    summary = (f"every object is explained by the history ({n_unknown} unknown-outcome ops, "
               f"{len(extra)} pre-auth key(s) charged to unknown creates)") if not evidence else \
        f"{len(evidence)} object(s) no operation explains"
    return Check("attributable", not evidence, summary, evidence), extra


# -- linearizability -----------------------------------------------------------------------
def check_linearizable(history: list[Operation], max_states: int = 200_000) -> Check:
    ops = [op for op in history if not op.key.startswith("pak?:")]
    result = linearizability.check(ops, model_for, max_states=max_states)
    explored = sum(p.explored for p in result.partitions.values())
    if result.ok:
        return Check("linearizable", True, f"{len(result.partitions)} keys, {len(ops)} ops, "
                     f"{explored} states explored")
    evidence = [explain(p, ops) for p in result.failures + result.unknowns]
    what = (f"{len(result.failures)} key(s) not linearizable" if result.failures else
            f"{len(result.unknowns)} key(s) inconclusive (search budget exceeded)")
    return Check("linearizable", False, f"{what} of {len(result.partitions)}", evidence)


def explain(p, history: list[Operation], tail: int = 8) -> str:
    """A failed key in a screenful: the end of the longest linearizable prefix, the op no
    order can place, the candidates, and ops recorded as failed around it (a "failed"
    write whose value is later read is the classic sign of a false failure report)."""
    lines = [f"key {p.key!r}: {p.result} ({p.explored} states explored)",
             f"  longest linearizable prefix: {len(p.linearization)} ops, model state after it: {p.state!r}"]
    lines += [f"    {op.describe()}" for op in p.linearization[-tail:]]
    if p.stuck is None:
        return "\n".join(lines)
    lines.append(f"  no order places this op before it completes: {p.stuck.describe()}")
    lines.append("  candidates not yet placed, invoked by then:")
    lines += [f"    {op.describe()}  <- {p._verdict_from_state(op)}" for op in p.unlinearized[:tail]]
    near = [op for op in history if op.key == p.key and op.status == FAIL
            and p.stuck.invoke - 10 <= op.invoke <= (p.stuck.complete or op.invoke)]
    if near:
        lines.append("  ops on this key recorded as FAIL (never applied) shortly before; see attempts.jsonl:")
        lines += [f"    {op.describe()} value {op.value!r}" for op in near[-tail:]]
    return "\n".join(lines)


# -- lost acknowledged writes --------------------------------------------------------------------
def _effect(op: Operation):
    return freeze(op.value) if op.f == "write" else EFFECT.get(op.f)


def check_acknowledged(history: list[Operation], final: dict[str, Any]) -> Check:
    """For each key, some write that may be linearized last must explain the final value.

    A write w can be last unless an acknowledged write w2 began after w ended (then w2 is
    after w in every linearization). Unknown writes never end. If only unknown writes
    exist, the initial value is possible too.
    """
    by_key = defaultdict(list)
    for op in history:
        if op.status != FAIL and (op.f == "write" or op.f in EFFECT):
            by_key[op.key].append(op)
    evidence, checked = [], 0
    for key, writes in sorted(by_key.items()):
        if key not in final:
            continue
        checked += 1
        oks = [w for w in writes if w.status == OK]
        last = [w for w in writes if not any(w2.invoke > w.deadline for w2 in oks)]
        allowed = {_effect(w) for w in last}
        if not oks:
            allowed.add(model_for(key).init())
        value = freeze(final[key])
        if value not in allowed:
            acked = [w for w in last if w.status == OK]
            lines = [f"key {key!r}: final state {final[key]!r}, but it must be one of {sorted(map(repr, allowed))}",
                     "  acknowledged write(s) that nothing later can undo:"]
            lines += [f"    {w.describe()}" for w in acked]
            lines += [f"    (may also be last, unknown outcome) {w.describe()}" for w in last if w.status != OK]
            evidence.append("\n".join(lines))
    acked = sum(op.status == OK for ops in by_key.values() for op in ops)
    summary = (f"{acked} acknowledged writes on {checked} keys, none lost" if not evidence
               else f"{len(evidence)} key(s) lost an acknowledged write")
    return Check("acknowledged", not evidence, summary, evidence)


# -- atomicity: references and audit ------------------------------------------------------------
def _public(record: dict, table: str) -> dict:
    out = {k: v for k, v in record.items() if k not in SECRET_FIELDS}
    if table == "nodes":
        out = {k: v for k, v in out.items() if k not in UNAUDITED_NODE_FIELDS}
    return out


def check_atomic(tables: dict) -> Check:
    """No command half applied: every derived index matches, the audit chain verifies and
    replaying the audit's before/after records yields exactly the stored records."""
    ev = []
    users, nodes, keys = tables["users"], tables["nodes"], tables["preauth_keys"]
    for kid, k in keys.items():
        if k["user"] not in users:
            ev.append(f"pre-auth key {kid} belongs to missing user {k['user']!r}")
    for nid, n in nodes.items():
        if tables["node_ips"].get(n["ipv4"]) != nid:
            ev.append(f"node {nid}: node_ips[{n['ipv4']}] is {tables['node_ips'].get(n['ipv4'])!r}")
        if tables["node_by_machine"].get(n["machine_key"]) != nid:
            ev.append(f"node {nid}: node_by_machine entry is {tables['node_by_machine'].get(n['machine_key'])!r}")
        if n.get("user") is not None and n["user"] not in users:
            ev.append(f"node {nid} belongs to missing user {n['user']!r}")
    for ip, nid in tables["node_ips"].items():
        if nid not in nodes:
            ev.append(f"node_ips[{ip}] points to missing node {nid}")
    for m, nid in tables["node_by_machine"].items():
        if nid not in nodes:
            ev.append(f"node_by_machine[{m[:12]}...] points to missing node {nid}")
    entries = [e for _, e in sorted(tables["audit"].items())]
    ok, why = verify_chain(entries)
    if not ok:
        ev.append(f"audit chain: {why}")
    folded: dict[str, dict] = defaultdict(dict)
    for e in entries:
        kind, _, ident = e["target"].partition(":")
        table = TABLE_OF_TARGET.get(kind)
        if table is None:
            continue
        if e["after"] is None:
            folded[table].pop(ident, None)
        else:
            folded[table][ident] = e["after"]
    for table in sorted(set(TABLE_OF_TARGET.values())):
        stored = {k: _public(v, table) for k, v in tables[table].items()}
        replayed = {k: _public(v, table) for k, v in folded[table].items()}
        for k in sorted(set(stored) | set(replayed)):
            if stored.get(k) != replayed.get(k):
                ev.append(f"{table}[{k}]: stored {stored.get(k)!r} but the audit log says {replayed.get(k)!r}")
    summary = (f"{len(entries)} audit entries verify and reproduce {sum(len(tables[t]) for t in set(TABLE_OF_TARGET.values()))} "
               "records; all references hold") if not ev else f"{len(ev)} half-applied or inconsistent record(s)"
    return Check("atomic", not ev, summary, ev)


# -- convergence -----------------------------------------------------------------------------------
def current_members(addresses: dict[str, str], members: dict[str, list[str]]) -> list[str]:
    """The replicas in the membership that most replicas report (each counted once, by the
    replicas it lists themselves); all of them when none reported. A replica removed but left
    running still lists itself with its old peers, while the others no longer list it."""
    votes: dict[tuple, int] = {}
    for rid, listed in members.items():
        if addresses.get(rid) in listed:
            key = tuple(sorted(listed))
            votes[key] = votes.get(key, 0) + 1
    if not votes:
        return sorted(addresses)
    agreed = max(votes, key=lambda m: (votes[m], len(m), m))
    return sorted(rid for rid, addr in addresses.items() if addr in agreed)


def check_converged(digests: dict[str, tuple[int, str] | None], members: dict[str, list[str]] | None = None,
                    current: Iterable[str] | None = None) -> Check:
    """Every current member (all replicas unless `current` says) at the same version with
    the same digest and the same members; a replica that is not a member is only named."""
    current = set(digests if current is None else current)
    left_out = sorted(r for r in digests if r not in current)
    digests = {r: d for r, d in digests.items() if r in current}
    members = {r: m for r, m in (members or {}).items() if r in current}
    ev = []
    missing = sorted(r for r, d in digests.items() if d is None)
    if missing:
        ev.append(f"no state could be read from {', '.join(missing)}")
    present = {r: d for r, d in digests.items() if d is not None}
    if len({d for d in present.values()}) > 1:
        for r, (version, digest) in sorted(present.items()):
            ev.append(f"{r}: version {version} digest {digest}")
    if members and len({tuple(sorted(m)) for m in members.values()}) > 1:
        for r, m in sorted(members.items()):
            ev.append(f"{r}: raft members {sorted(m)}")
    note = f"; not a member, not compared: {', '.join(left_out)}" if left_out else ""
    if ev:
        return Check("converged", False, "replicas differ" + note, ev)
    if not present:
        return Check("converged", False, "no member's state to compare" + note)
    version, digest = next(iter(present.values()))
    return Check("converged", True, f"{len(present)} replicas at version {version}, digest {digest[:16]}{note}")


# Answers explained by a reported, not yet fixed raftmesh bug (docs/chaos.md, "Bugs found").
# They are listed in the summary, not failed on; remove an entry once its fix lands.
KNOWN_ISSUES: tuple = ()  # (name, match) pairs of answers tolerated while a bug is open


def check_responses(anomalies: list, known=KNOWN_ISSUES) -> Check:
    """No answer a correct replica never gives this workload (a 500, a 401 for the admin key)."""
    ev, matched = [], {}
    for a in anomalies:
        issue = next((name for name, match in known if match(a)), None)
        if issue:
            matched[issue] = matched.get(issue, 0) + 1
        else:
            ev.append(f"t={a.time:.3f}s {a.what}: HTTP {a.status} {a.body}")
    notes = "; ".join(f"{n} matched known issue {k}" for k, n in matched.items())
    summary = ("no unexpected answers" if not ev else
               f"{len(ev)} answer(s) a correct replica never gives this workload") + (f" ({notes})" if notes else "")
    return Check("responses", not ev, summary, ev)


def latency_stats(history: list[Operation]) -> dict:
    lat = sorted(op.complete - op.invoke for op in history if op.status == OK and op.process not in ("final", "attributed"))
    if not lat:
        return {}
    pick = lambda q: lat[min(len(lat) - 1, math.floor(q * len(lat)))]
    return {"p50_ms": round(pick(0.5) * 1000, 1), "p99_ms": round(pick(0.99) * 1000, 1),
            "max_ms": round(lat[-1] * 1000, 1)}
