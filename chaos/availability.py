"""Availability per fault window: how long the cluster went without acknowledging a write.

Safety checks cannot see a cluster that is correct but stalls for seconds after losing one
replica. For every fault window this measures the longest stretch without an acknowledged
write on the replicas the fault did not target (the majority, for a single-replica fault)
and, after the heal, on any replica. `check_available` fails the run when a single-replica
fault left the majority without a write for more than MAX_GAP seconds: a cluster of 3 or 5
must ride through one bad replica within about an election. Pure functions of the acks and
the timeline, so they can be tested on hand-made data.
"""
from __future__ import annotations

from .checkers import Check

MAX_GAP = 2.0  # seconds; an election takes 0.3-0.6 s, a leader notices lost quorum in ~1 s
AFTER = 5.0  # seconds after a heal that still belong to its fault (recovery)


def single_replica(entry: dict) -> bool:
    """A fault that touches one replica only: the other replicas are a working majority."""
    kind, target, params = entry["kind"], entry["target"], entry.get("params", {})
    if params.get("all_ready_at_start") is False:  # another replica was still recovering
        return False
    if kind in ("kill", "pause", "oneway", "clock", "diskfull"):
        return True
    if kind == "partition":
        return params.get("mode") in ("isolate-one", "isolate-leader")
    if kind in ("loss", "latency"):
        return target != "all"
    return False


def longest_gap(times: list[float], start: float, end: float) -> tuple[float, float]:
    """(from, to) of the longest interval inside [start, end] with none of `times` in it."""
    points = [start] + sorted(t for t in times if start < t < end) + [end]
    return max(zip(points, points[1:]), key=lambda p: p[1] - p[0])


def fault_gaps(acks: list[tuple[float, str]], timeline: list[dict], run_end: float) -> list[dict]:
    """Per fault window: the longest write gap on the untouched replicas during it, and on
    any replica in the AFTER seconds after its heal (cut at the next fault or the run end).
    `acks` are (time, replica id) of acknowledged writes."""
    rows = []
    starts = sorted(e["start"] for e in timeline)
    for e in timeline:
        end = min(e["end"] if e["end"] is not None else run_end, run_end)  # writes stop at run_end
        spared = [t for t, rid in acks if rid != e["target"]]
        during = longest_gap(spared, e["start"], end)
        later = [s for s in starts if s > e["start"]]
        after_end = min([end + AFTER, run_end] + later)
        after = longest_gap([t for t, _ in acks], end, after_end) if after_end > end else (run_end, run_end)
        rows.append({"index": e["index"], "kind": e["kind"], "target": e["target"],
                     "detail": e.get("detail", ""), "leader": e.get("leader"),
                     "single_replica": single_replica(e),
                     "during": _span(during), "after": _span(after)})
    return rows


def _span(span: tuple[float, float]) -> dict:
    return {"seconds": round(span[1] - span[0], 3), "from": round(span[0], 3), "to": round(span[1], 3)}


def check_available(gaps: list[dict], max_gap: float = MAX_GAP) -> Check:
    judged = [g for g in gaps if g["single_replica"]]
    bad = [g for g in judged if max(g["during"]["seconds"], g["after"]["seconds"]) > max_gap]
    evidence = [f"#{g['index']} {g['detail'] or g['kind']} (leader {g['leader']}): no write on the other "
                f"replicas for {g['during']['seconds']:.1f}s ({g['during']['from']:.1f}-{g['during']['to']:.1f}s), "
                f"after the heal {g['after']['seconds']:.1f}s ({g['after']['from']:.1f}-{g['after']['to']:.1f}s)"
                for g in bad]
    worst = max([max(g["during"]["seconds"], g["after"]["seconds"]) for g in judged] or [0.0])
    summary = (f"{len(judged)} single-replica fault window(s), the majority's longest write gap "
               f"{worst:.1f}s (limit {max_gap:g}s)")
    return Check("available", not bad, summary, evidence)
