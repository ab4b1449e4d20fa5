"""`raftmesh bench scale`: CPU cost of keeping netmaps current, at 100 / 1,000 / 10,000 nodes.

Issue #5 target: one node change costs <= 20 ms of CPU at 10,000 nodes. What is timed is
`NetmapIndex` (cluster/netmap.py) in this process, on one thread, with `time.thread_time`:
CPU, not wall time, so a busy shared machine shifts the numbers less. Delta encoding and
sending are not included (they scale with fan-out, which is reported per change).

The network is shaped like a company, not a toy: ~80% user devices (users own 1-4 each, in
groups by department), ~20% tagged servers under ~12 tags, subnet routers, and a policy of
~30 ACLs mixing groups, tags, hosts/CIDRs, `*`, autogroup:member/tagged and autogroup:self.
Node changes are interleaved at random so N stays roughly constant:

- endpoint: a record-only change (endpoints, online) -- by far the most frequent in practice
- retag: a server moves between tags (web/ci/k8s/db/cache), changing its ACL membership
- add: a new device of an existing user
- delete: a device or server is removed

A policy change (one ACL added or removed) and the one-off index build are timed too, and at
one size (default 1,000) `compute_netmaps`, the O(n²) recompute-everything reference, so the
ratio shows what the index saves.

GC: by default (`--gc feed`) the process is tuned as a replica's feed is, by the same
GcTuning (api/gc_tuning.py): the build and each change run with automatic collection
paused, and the young collection a change deferred is run and counted at its end (or, for
a change of a large index making FREEZE_AFTER_DELTAS deltas, frozen as the feed's is);
after the build, `tune_gc_for_large_index()` (gc.collect + gc.freeze, young threshold
20,000) when the index has >= FREEZE_MIN_NODES nodes. `--gc plain` leaves the collector
alone, to see what that buys; there its CPU is counted in the change that triggered it. A
replica also re-freezes every REFREEZE_EVERY changes (more than are run here): one cheap
and one full `refreeze_gc()` are timed after the node changes instead.

Not measured here: memory per agent stream (issue #5 `scale`, second half) -- it needs the
agent stream, which is being built; add it to this module once streams exist.
"""
from __future__ import annotations

import contextlib
import cProfile
import gc
import io
import json
import os
import pstats
import random
import time

from raftmesh.api.gc_tuning import GcTuning, refreeze_gc
from raftmesh.cluster.netmap import NetmapIndex, compute_netmaps
from raftmesh.cluster.policy import parse_policy

from raftmesh.bench import report

NOW = 1_800_000_000.0
DAY = 86400.0
TARGET_NODE_CHANGE_MS = 20.0  # issue #5, at 10,000 nodes
NODE_KINDS = ("endpoint", "retag", "add", "delete")
RETAGGABLE = ("tag:web", "tag:ci", "tag:k8s", "tag:db", "tag:cache")
# Department -> share of users; sre and admins are drawn from eng.
DEPARTMENTS = (("eng", 0.30), ("sales", 0.15), ("support", 0.10), ("data", 0.10),
               ("finance", 0.05), ("contractors", 0.10), (None, 0.20))
# Tag -> share of nodes (min 1 node each, so even tiny networks have every role).
TAG_SHARES = (("tag:web", 0.05), ("tag:k8s", 0.04), ("tag:ci", 0.03), ("tag:db", 0.02),
              ("tag:cache", 0.015), ("tag:logging", 0.005), ("tag:router", 0.003),
              ("tag:bastion", 0.002), ("tag:backup", 0.002), ("tag:monitoring", 0.001),
              ("tag:build", 0.01), ("tag:staging", 0.01))
ROUTES = ("10.10.0.0/16", "10.11.0.0/16", "10.20.0.0/16", "10.30.0.0/24")


# -- the synthetic network -----------------------------------------------------------------
def make_node(i: int, user: str | None, tags=(), rng: random.Random | None = None, **kw) -> dict:
    """A node record as the replicated state holds it (see tests/test_netmap.py)."""
    rng = rng or random.Random(i)
    return {"id": f"n{i}", "name": f"host{i}", "user": None if tags else user, "tags": list(tags),
            "node_key": f"nodekey:{i:064x}", "ipv4": f"100.{64 + i // 64000}.{i // 250 % 256}.{i % 250 + 1}",
            "ipv6": f"fd7a:115c:a1e0::{i + 1:x}",
            "endpoints": [f"198.51.100.{i % 250 + 1}:41641", f"10.0.{i % 200}.{i % 250 + 1}:41641"],
            "key_expiry": (NOW + rng.uniform(1, 180) * DAY) if not tags else None,
            "expired": False, "approved": True, "approved_routes": [], "last_seen": NOW,
            "online": rng.random() < 0.6, **kw}


class Network:
    """Users, groups, nodes and the policy text for a network of about `n` nodes."""

    def __init__(self, n: int, seed: int = 1):
        self.rng = rng = random.Random(seed)
        n_tagged = max(sum(max(1, round(n * s)) for _, s in TAG_SHARES), round(n * 0.2))
        n_user_devices = max(1, n - n_tagged)
        n_users = max(len(DEPARTMENTS), round(n_user_devices / 2.5))
        self.users = [f"u{i}" for i in range(n_users)]
        self.dept: dict[str, str | None] = {}
        for u in self.users:
            self.dept[u] = rng.choices([d for d, _ in DEPARTMENTS], [w for _, w in DEPARTMENTS])[0]
        eng = [u for u in self.users if self.dept[u] == "eng"] or self.users[:1]
        self.groups = {f"group:{d}": sorted(u for u in self.users if self.dept[u] == d)
                       for d, _ in DEPARTMENTS if d}
        self.groups["group:sre"] = sorted(eng[:max(1, len(eng) // 10)])
        self.groups["group:admins"] = sorted(self.users[:max(1, n_users // 100)])
        self.next_id = 0
        self.nodes: dict[str, dict] = {}
        for tag, share in TAG_SHARES:
            for _ in range(max(1, round(n * share))):
                self.add_tagged(tag)
        while len(self.nodes) < n_tagged:
            self.add_tagged(rng.choice(RETAGGABLE))
        for u in self.users:  # everyone has at least one device, then the rest at random
            if len(self.nodes) < n:
                self.add_device(u)
        while len(self.nodes) < n:
            self.add_device(rng.choice(self.users))

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def add_tagged(self, tag: str) -> dict:
        i = self._id()
        routes = [ROUTES[i % len(ROUTES)]] if tag == "tag:router" else []
        node = make_node(i, None, [tag], self.rng, approved_routes=routes)
        self.nodes[node["id"]] = node
        return node

    def add_device(self, user: str) -> dict:
        node = make_node(self._id(), user, (), self.rng)
        self.nodes[node["id"]] = node
        return node

    def policy_doc(self, extra_acl: bool = False, sparse: bool = False) -> dict:
        """The company policy. `sparse` drops the ACLs that make the mesh dense: every ACL
        with a `*` destination (admins, monitoring scrapes) and the department-wide reach
        of the web tier (eng, sales, support, contractors -> tag:web); sre keeps it."""
        def acl(src, dst, proto=None):
            return {"action": "accept", "src": src, "dst": dst, **({"proto": proto} if proto else {})}
        acls = [
            acl(["group:admins"], ["*:*"]),
            acl(["group:sre"], ["tag:web:*", "tag:db:*", "tag:cache:*", "tag:k8s:*", "tag:ci:22"]),
            acl(["group:sre", "group:admins"], ["tag:bastion:22", "tag:monitoring:3000,9090"]),
            acl(["group:eng"], ["tag:web:80,443,8080"]),
            acl(["group:eng"], ["tag:ci:22,443"]),
            acl(["group:eng"], ["tag:k8s:443,6443"]),
            acl(["group:eng"], ["tag:staging:*"]),
            acl(["group:eng"], ["dev-net:22,80,443"]),
            acl(["group:eng", "group:contractors"], ["tag:build:443"], "tcp"),
            acl(["group:data"], ["tag:db:5432"], "tcp"),
            acl(["group:data"], ["tag:cache:6379"], "tcp"),
            acl(["group:data"], ["tag:k8s:8888"]),
            acl(["group:sales", "group:support"], ["tag:web:443"], "tcp"),
            acl(["group:support"], ["tag:bastion:22"], "tcp"),
            acl(["group:finance"], ["finance-net:443"], "tcp"),
            acl(["group:contractors"], ["tag:web:443"], "tcp"),
            acl([self.users[0], self.users[-1]], ["tag:db:*"]),
            acl(["tag:web"], ["tag:db:5432", "tag:cache:6379"], "tcp"),
            acl(["tag:k8s"], ["tag:db:5432", "tag:cache:6379"], "tcp"),
            acl(["tag:ci"], ["tag:k8s:6443", "tag:web:22", "tag:staging:22"]),
            acl(["tag:build"], ["tag:ci:443"]),
            acl(["tag:bastion"], ["tag:db:22", "tag:web:22", "tag:k8s:22"], "tcp"),
            acl(["tag:backup"], ["tag:db:*"]),
            acl(["tag:monitoring"], ["*:9100,9090"], "tcp"),
            acl(["autogroup:tagged"], ["tag:logging:514,6514"]),
            acl(["autogroup:member"], ["autogroup:self:*"]),
            acl(["autogroup:member"], ["tag:monitoring:3000"], "tcp"),
            acl(["autogroup:member"], ["office-net:*"]),
            acl(["corp-vpn"], ["tag:web:443"], "tcp"),
            acl(["tag:staging"], ["tag:cache:6379"], "tcp"),
        ]
        if extra_acl:
            acls.append(acl(["group:support", "group:sales"], ["tag:ci:443"], "tcp"))
        if sparse:
            wide = {"group:eng", "group:sales", "group:support", "group:contractors"}
            acls = [a for a in acls if not any(d.startswith("*:") for d in a["dst"])
                    and not (wide & set(a["src"]) and any(d.startswith("tag:web:") for d in a["dst"]))]
        return {"groups": self.groups,
                "tagOwners": {t: ["group:sre"] for t, _ in TAG_SHARES},
                "hosts": {"office-net": "10.10.0.0/15", "dev-net": "10.20.0.0/16",
                          "finance-net": "10.30.0.0/24", "corp-vpn": "192.168.0.0/16"},
                "acls": acls}

    def policy(self, extra_acl: bool = False, sparse: bool = False):
        return parse_policy(json.dumps(self.policy_doc(extra_acl, sparse)))

    # -- one change of each kind, applied to self.nodes; returns the op for the index --------
    def change(self, kind: str):
        rng = self.rng
        if kind == "endpoint":
            node = dict(rng.choice(list(self.nodes.values())))
            node["endpoints"] = [f"203.0.113.{rng.randint(1, 254)}:{rng.randint(1024, 65535)}"]
            node["online"] = not node["online"]
            node["last_seen"] = NOW + rng.random()
        elif kind == "retag":
            movable = [n for n in self.nodes.values() if n["tags"] and n["tags"][0] in RETAGGABLE]
            node = dict(rng.choice(movable))
            node["tags"] = [rng.choice([t for t in RETAGGABLE if t != node["tags"][0]])]
        elif kind == "add":
            node = make_node(self._id(), rng.choice(self.users), (), rng)
        elif kind == "delete":
            pool = [k for k, n in self.nodes.items() if not n["tags"] or n["tags"][0] in RETAGGABLE]
            node_id = rng.choice(pool)
            del self.nodes[node_id]
            return ("remove", node_id)
        else:
            raise ValueError(kind)
        self.nodes[node["id"]] = node
        return ("upsert", node)


# -- measuring -----------------------------------------------------------------------------
class _GcClock:
    """CPU spent in the cyclic garbage collector, so its share of a change can be reported
    (a full collection walks every tracked object of a large index)."""

    def __init__(self):
        self.total, self.full, self._t0 = 0.0, 0, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.thread_time()
        else:
            self.total += time.thread_time() - self._t0
            self.full += info["generation"] == 2

    def __enter__(self):
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self)


def _cpu(fn):
    """(result, CPU seconds of this thread) for one call."""
    t0 = time.thread_time()
    out = fn()
    return out, time.thread_time() - t0


def _apply(index: NetmapIndex, op, version: int):
    what, arg = op
    if what == "policy":
        return index.replace_policy(arg, version)
    return index.upsert_node(arg, version) if what == "upsert" else index.remove_node(arg, version)


def _apply_as_feed(index: NetmapIndex, op, version: int, tuning: GcTuning):
    """_apply as a replica's NetmapFeed runs it, plus the young collection it deferred
    (which the feed pays at its next allocation), so that the change is charged with it;
    or, for a change of a large index making FREEZE_AFTER_DELTAS deltas, the freeze the
    tuning does instead."""
    with tuning.changing():
        out = _apply(index, op, version)
        tuning.batch_made(len(out.deltas))
    if gc.get_count()[0] > gc.get_threshold()[0]:
        gc.collect(0)
    return out


def measure_size(n: int, changes: int, policy_changes: int, seed: int, reference: bool,
                 progress: report.Progress, profile: bool = False, gc_mode: str = "feed",
                 sparse: bool = False) -> dict:
    """Build an index over a network of `n` nodes, then time `changes` node changes of each
    kind (interleaved) and `policy_changes` policy changes."""
    net = Network(n, seed)
    pol, pol_extra = net.policy(False, sparse), net.policy(True, sparse)
    nodes = list(net.nodes.values())
    gc.collect()
    progress.update(f"N={n}: building the index", force=True)
    tuning = GcTuning()
    with tuning.changing() if gc_mode == "feed" else contextlib.nullcontext():
        index, build_cpu = _cpu(lambda: NetmapIndex(pol, nodes, NOW))
    out = {"n": len(nodes), "users": len(net.users), "acls": len(pol.acls),
           "edges": sum(len(index.netmap(k, 0).peers) for k in index.visible_ids()) // 2,
           "build_cpu_s": build_cpu, "gc_mode": gc_mode, "policy": "sparse" if sparse else "dense"}
    threshold = gc.get_threshold()
    if gc_mode == "feed":  # as a replica's feed does after building its index (not build time)
        _, freeze_cpu = _cpu(lambda: tuning.index_size(index.visible_count()))
        if tuning.large:
            out["freeze_cpu_s"] = freeze_cpu
    frozen = tuning.large
    out["gc_tracked_objects"] = len(gc.get_objects())
    out["gc_frozen_objects"] = gc.get_freeze_count()
    if reference:
        progress.update(f"N={n}: compute_netmaps (O(n²) reference)", force=True)
        _, ref_cpu = _cpu(lambda: compute_netmaps(pol, list(net.nodes.values()), NOW, 1))
        out["compute_netmaps_cpu_s"] = ref_cpu

    version = 1
    kinds = (*NODE_KINDS, "policy")
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    fanout: dict[str, list[int]] = {k: [] for k in kinds}
    in_gc = {k: [0.0, 0] for k in kinds}  # CPU seconds in the collector, full collections
    schedule = [k for k in NODE_KINDS for _ in range(changes)]
    net.rng.shuffle(schedule)
    schedule += ["policy"] * policy_changes
    apply = (lambda *a: _apply_as_feed(*a, tuning)) if gc_mode == "feed" else _apply
    with _GcClock() as gc_clock:
        for j, kind in enumerate(schedule):
            version += 1
            if kind == "policy":
                p = pol_extra if len(samples["policy"]) % 2 == 0 else pol
                op = ("policy", p)
            else:
                op = net.change(kind)
            if kind == "policy" and "gc_unfrozen_after_node_changes" not in out:
                # what the node changes left for the collector, and re-freezing it (as
                # a replica does every REFREEZE_EVERY changes; not counted in any change)
                out["gc_unfrozen_after_node_changes"] = len(gc.get_objects())
                if frozen:
                    _, out["refreeze_cpu_s"] = _cpu(refreeze_gc)
                    _, out["full_refreeze_cpu_s"] = _cpu(lambda: refreeze_gc(full=True))
            before = (gc_clock.total, gc_clock.full)
            changes_out, cpu = _cpu(lambda: apply(index, op, version))
            samples[kind].append(cpu)
            fanout[kind].append(len(changes_out.deltas))
            in_gc[kind][0] += gc_clock.total - before[0]
            in_gc[kind][1] += gc_clock.full - before[1]
            progress.update(f"N={n}: {kind} change {j + 1}/{len(schedule)}", force=kind == "policy")
    if policy_changes % 2:  # leave the base policy in place
        index.replace_policy(pol, version + 1)

    out["kinds"] = {}
    for kind, lat in samples.items():
        f = sorted(fanout[kind])
        out["kinds"][kind] = {**report.summarize(lat), "deltas_p50": report.percentile(f, 0.5),
                              "deltas_max": f[-1] if f else 0, "full_gcs": in_gc[kind][1],
                              "gc_share": in_gc[kind][0] / sum(lat) if sum(lat) > 0 else 0.0}
    out["samples_s"] = samples
    if profile:
        out["profile"] = _profile(index, net, version, min(changes, 100))
    if frozen:  # the next size starts from a clean collector
        gc.unfreeze()
        gc.set_threshold(*threshold)
    return out


def _profile(index: NetmapIndex, net: Network, version: int, per_kind: int) -> list[dict]:
    """Where the node-change CPU goes: cProfile over `per_kind` more changes of each kind."""
    ops = [net.change(k) for k in NODE_KINDS for _ in range(per_kind)]
    prof = cProfile.Profile()
    for op in ops:
        version += 1
        prof.runcall(_apply, index, op, version)
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, fn), (_cc, ncalls, tottime, cumtime, _) in stats.stats.items():
        rows.append({"function": f"{os.path.basename(file)}:{line}({fn})", "calls": ncalls,
                     "tottime_s": tottime, "cumtime_s": cumtime})
    by_own = sorted(rows, key=lambda r: r["tottime_s"], reverse=True)[:15]
    by_cum = sorted(rows, key=lambda r: r["cumtime_s"], reverse=True)[:15]
    return {"changes": len(ops), "by_own_time": by_own, "by_cumulative_time": by_cum}


def run(out_dir: str, sizes=(100, 1000, 10000), changes: int = 200, policy_changes: int = 6,
        reference_at: int | None = 1000, seed: int = 1, profile: bool = False,
        gc_mode: str = "feed", sparse: bool = False) -> dict:
    progress = report.Progress("scale")
    per_size = []
    for n in sizes:
        per_size.append(measure_size(n, changes, policy_changes, seed, reference=(n == reference_at),
                                     progress=progress, profile=profile and n == max(sizes),
                                     gc_mode=gc_mode, sparse=sparse))
    progress.done()

    rows = []
    for s in per_size:
        for kind, st in s["kinds"].items():
            rows.append({"nodes": s["n"], "change": kind, **{k: st[k] for k in
                         ("n", "p50_ms", "p99_ms", "max_ms", "mean_ms", "deltas_p50", "deltas_max",
                          "full_gcs", "gc_share")}})
        rows.append({"nodes": s["n"], "change": "index build (once)", "n": 1,
                     "p50_ms": s["build_cpu_s"] * 1e3, "p99_ms": None, "max_ms": None})
        if "compute_netmaps_cpu_s" in s:
            rows.append({"nodes": s["n"], "change": "compute_netmaps (reference)", "n": 1,
                         "p50_ms": s["compute_netmaps_cpu_s"] * 1e3, "p99_ms": None, "max_ms": None})
    result = {"benchmark": "scale", "machine": report.machine(), "timer": "time.thread_time (CPU)",
              "changes_per_kind": changes, "policy_changes": policy_changes, "seed": seed,
              "gc_mode": gc_mode, "policy": "sparse" if sparse else "dense",
              "sizes": [{**{k: v for k, v in s.items() if k != "samples_s"}, "samples_ms": {
                  kind: [round(v * 1e3, 4) for v in vals] for kind, vals in s["samples_s"].items()}}
                  for s in per_size],
              "rows": rows}

    ref = next((s for s in per_size if "compute_netmaps_cpu_s" in s), None)
    if ref:
        result["reference_ratio"] = {
            "nodes": ref["n"], "compute_netmaps_ms": ref["compute_netmaps_cpu_s"] * 1e3,
            **{f"{kind}_x": ref["compute_netmaps_cpu_s"] * 1e3 / st["p50_ms"]
               for kind, st in ref["kinds"].items() if st["p50_ms"] > 0}}
    largest = max(per_size, key=lambda s: s["n"])
    worst = max(largest["kinds"][k]["p99_ms"] for k in NODE_KINDS)
    result["target"] = {"what": f"one node change <= {TARGET_NODE_CHANGE_MS:g} ms CPU at 10,000 nodes",
                        "at_nodes": largest["n"], "worst_kind_p99_ms": worst,
                        "met_at_p99": worst <= TARGET_NODE_CHANGE_MS,
                        "worst_kind_max_ms": max(largest["kinds"][k]["max_ms"] for k in NODE_KINDS)}

    report.print_table("netmap index CPU per change (time.thread_time)", rows,
                       ["nodes", "change", "n", "p50_ms", "p99_ms", "max_ms", "deltas_p50", "deltas_max",
                        "full_gcs", "gc_share"])
    if ref:
        r = result["reference_ratio"]
        print(f"\ncompute_netmaps at {r['nodes']} nodes: {r['compute_netmaps_ms']:.1f} ms CPU, i.e. "
              + ", ".join(f"{k[:-2]} x{v:.0f}" for k, v in r.items() if k.endswith("_x"))
              + " the index's p50")
    t = result["target"]
    for s in per_size:
        print(f"N={s['n']}: {s['policy']} policy, {2 * s['edges'] / s['n']:.0f} peers per node, "
              f"GC mode {s['gc_mode']}, {s['gc_tracked_objects']:,} tracked objects, "
              f"{s['gc_frozen_objects']:,} frozen, "
              f"{s.get('gc_unfrozen_after_node_changes', 0):,} unfrozen after the node changes"
              + (f" (re-freeze {s['refreeze_cpu_s'] * 1e3:.0f} ms, full "
                 f"{s['full_refreeze_cpu_s'] * 1e3:.0f} ms)" if "refreeze_cpu_s" in s else "")
              + (f" (freeze took {s['freeze_cpu_s'] * 1e3:.0f} ms)" if "freeze_cpu_s" in s else ""))
    print(f"target ({t['what']}): worst p99 at {t['at_nodes']} nodes {t['worst_kind_p99_ms']:.2f} ms "
          f"-> {'met' if t['met_at_p99'] else 'MISSED'}")
    if largest.get("profile"):
        prof = largest["profile"]
        for order in ("by_own_time", "by_cumulative_time"):
            print(f"\ncProfile of {prof['changes']} node changes at {largest['n']} nodes, "
                  f"{order.replace('_', ' ')} (own ms, cumulative ms, calls):")
            for p in prof[order][:10]:
                print(f"  {p['tottime_s'] * 1e3:9.1f} {p['cumtime_s'] * 1e3:9.1f} {p['calls']:>9}  "
                      f"{p['function']}")
    report.save(out_dir, "scale", result, lambda: plot(out_dir, per_size))
    return result


def plot(out_dir: str, per_size: list[dict]) -> str:
    """Left: p50/p99 CPU per change vs N (log-log). Right: CDFs of node changes at the
    largest N (where the target applies)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    ns = [s["n"] for s in per_size]
    for kind in (*NODE_KINDS, "policy"):
        line, = a1.plot(ns, [max(s["kinds"][kind]["p50_ms"], 1e-3) for s in per_size], "o-",
                        label=f"{kind} p50")
        a1.plot(ns, [max(s["kinds"][kind]["p99_ms"], 1e-3) for s in per_size], "x--",
                color=line.get_color(), alpha=0.6, label=f"{kind} p99")
    a1.plot(ns, [s["build_cpu_s"] * 1e3 for s in per_size], "s:", color="black", label="index build")
    refs = [(s["n"], s["compute_netmaps_cpu_s"] * 1e3) for s in per_size if "compute_netmaps_cpu_s" in s]
    if refs:
        a1.plot(*zip(*refs), "*", color="red", markersize=12, label="compute_netmaps (O(n²))")
    a1.axhline(TARGET_NODE_CHANGE_MS, color="grey", lw=0.8, ls="-.")
    a1.annotate(f"target {TARGET_NODE_CHANGE_MS:g} ms", (ns[0], TARGET_NODE_CHANGE_MS), fontsize=8)
    a1.set_xscale("log")
    a1.set_yscale("log")
    a1.set_xlabel("nodes")
    a1.set_ylabel("CPU per change (ms)")
    a1.set_title("NetmapIndex CPU per change vs N")
    a1.grid(True, which="both", alpha=0.3)
    a1.legend(fontsize=7, ncol=2)
    largest = max(per_size, key=lambda s: s["n"])
    for kind, values in largest["samples_s"].items():
        s = sorted(max(v * 1e3, 1e-3) for v in values)
        if s:
            a2.plot(s, [(i + 1) / len(s) for i in range(len(s))], label=f"{kind} (n={len(s)})")
    a2.axvline(TARGET_NODE_CHANGE_MS, color="grey", lw=0.8, ls="-.")
    a2.set_xscale("log")
    a2.set_xlabel("CPU per change (ms)")
    a2.set_ylabel("fraction of changes")
    a2.set_title(f"CDF at {largest['n']} nodes")
    a2.grid(True, which="both", alpha=0.3)
    a2.legend(fontsize=8)
    return report.save_figure(fig, out_dir, "scale")


# -- CLI: `raftmesh bench scale` (bench/cli.py) ---------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--sizes", default="100,1000,10000",
                        help="comma-separated node counts (default 100,1000,10000)")
    parser.add_argument("--changes", type=int, default=200, help="node changes of each kind per size")
    parser.add_argument("--policy-changes", type=int, default=6, help="policy changes per size")
    parser.add_argument("--reference-at", type=int, default=1000,
                        help="size at which to also time compute_netmaps (0: never)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", action="store_true",
                        help="cProfile node changes at the largest size and print the top entries")
    parser.add_argument("--gc", choices=("feed", "plain"), default="feed",
                        help="feed: freeze the built index out of the GC's reach as NetmapFeed "
                             "does (default); plain: leave the collector alone")
    parser.add_argument("--policy", choices=("dense", "sparse"), default="dense",
                        help="dense: the company policy (~1,500 peers per node at 10,000); "
                             "sparse: without its `*` destinations and department-wide web access")


def main(args) -> int:
    sizes = [int(x) for x in str(args.sizes).split(",") if x.strip()]
    run(args.out, sizes, args.changes, args.policy_changes, args.reference_at or None, args.seed,
        args.profile, getattr(args, "gc", "feed"), getattr(args, "policy", "dense") == "sparse")
    return 0
