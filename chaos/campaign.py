"""`raftmesh chaos campaign`: many seeded schedules back to back, one verdict table.

One run meets one schedule; bugs hide in the interleavings of many. A campaign runs
`--runs` seeds (3 and 5 replicas in turn, every fault kind), each a full `chaos run` in its
own directory, and writes one table (campaign.txt, campaign.json, campaign.png) with each
run's verdict, failed checks, ops, the longest write gap of the majority and the machine's
load. A run that fails only the availability check is run again with the same seed (a
loaded machine can stall a replica's process; a real stall repeats); both results are kept
and the run still counts as failed if the repeat fails too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import run as chaos_run
from .schedule import make_schedule


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--runs", type=int, default=10, help="how many seeded schedules")
    parser.add_argument("--seed", type=int, default=1, help="the first run's seed (the others follow)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of workload per run")
    parser.add_argument("--faults", default=None, help="as for `chaos run` (default: every kind)")
    parser.add_argument("--replicas", default="3,5", help="replica counts used in turn")
    parser.add_argument("--out", default="chaos-campaign", help="directory for the runs and the table")
    parser.add_argument("--agents", type=int, default=0, help="as for `chaos run`")


def main(args) -> int:
    try:
        sizes = [int(n) for n in args.replicas.split(",")]
    except ValueError:
        sizes = []
    if args.runs < 1 or not sizes or any(n not in (3, 5) for n in sizes):
        print("raftmesh chaos campaign: --runs must be >= 1 and --replicas a list of 3 and 5",
              file=sys.stderr)
        return 2
    try:  # refused once, before the first run, rather than by each of the N runs
        for replicas in set(sizes):
            make_schedule(args.seed, args.duration, chaos_run.requested_faults(args.faults), replicas)
    except ValueError as e:
        print(f"raftmesh chaos campaign: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    rows, started = [], time.monotonic()
    for i in range(args.runs):
        seed, replicas = args.seed + i, sizes[i % len(sizes)]
        row = _one(args, seed, replicas, os.path.join(args.out, f"run-{i + 1:03d}-seed{seed}"))
        if row["failed"] == ["available"]:
            row["rerun"] = _one(args, seed, replicas, os.path.join(args.out, f"run-{i + 1:03d}-seed{seed}-again"))
        rows.append(row)
        done = time.monotonic() - started
        print(f"[campaign {i + 1}/{args.runs}] seed {seed}, {replicas} replicas: {_verdict(row)}, "
              f"{row['ops']} ops, worst majority write gap {row['worst_gap']}s, load {row['load']} "
              f"| {done / 60:.1f} min, ~{done / (i + 1) * (args.runs - i - 1) / 60:.1f} min left", flush=True)
        _write(args.out, rows)
    text = _write(args.out, rows)
    print("\n" + text, flush=True)
    return 0 if all(_counts_as_pass(r) for r in rows) else 1


def _one(args, seed: int, replicas: int, out: str) -> dict:
    parser = argparse.ArgumentParser()
    chaos_run.add_arguments(parser)
    argv = ["--seed", str(seed), "--duration", f"{args.duration:g}", "--replicas", str(replicas),
            "--agents", str(args.agents), "--out", out] + (["--faults", args.faults] if args.faults else [])
    run_args = parser.parse_args(argv)
    rc = chaos_run.main(run_args)
    return summarize(rc, seed, replicas, out)


def summarize(rc: int, seed: int, replicas: int, out: str) -> dict:
    """The row of one run, from its summary.json (absent when the run could not start)."""
    try:
        with open(os.path.join(out, "summary.json")) as f:
            s = json.load(f)
    except (OSError, ValueError):
        return {"seed": seed, "replicas": replicas, "rc": rc, "verdict": "ERROR", "failed": ["run"],
                "ops": 0, "faults": 0, "worst_gap": None, "load": None, "out": out}
    judged = [g for g in s.get("write_gaps", []) if g["single_replica"]]
    worst = max([max(g["during"]["seconds"], g["after"]["seconds"]) for g in judged] or [0.0])
    return {"seed": seed, "replicas": replicas, "rc": rc, "verdict": s["verdict"],
            "failed": sorted(k for k, ok in s["checks"].items() if not ok), "ops": s["ops"],
            "ops_per_second": s["ops_per_second"], "faults": s["faults_injected"],
            "worst_gap": round(worst, 2), "load": s.get("load"), "out": out}


def _counts_as_pass(row: dict) -> bool:
    return row["verdict"] == "PASS" or row.get("rerun", {}).get("verdict") == "PASS"


def _verdict(row: dict) -> str:
    if "rerun" in row:
        return f"FAIL (available), re-run {row['rerun']['verdict']}"
    return row["verdict"] + (f" ({', '.join(row['failed'])})" if row["failed"] else "")


LIVENESS = frozenset({"available", "settled", "agents converged", "tunnel"})
HARNESS = frozenset({"faults", "run", "state"})  # the run itself failed, not the cluster


def failure_kind(row: dict) -> str | None:
    """A failed run's worst class: "safety" if any other check failed (an answer or the state
    was wrong), else "liveness" (it stalled or never settled), else "harness"."""
    if _counts_as_pass(row):
        return None
    failed = set(row["failed"])
    if failed - LIVENESS - HARNESS:
        return "safety"
    return "liveness" if failed & LIVENESS else "harness"


def render(rows: list[dict]) -> str:
    passed = sum(_counts_as_pass(r) for r in rows)
    kinds = [failure_kind(r) for r in rows]
    lines = [f"raftmesh chaos campaign: {passed}/{len(rows)} runs passed; failed: {kinds.count('safety')} "
             f"on a safety check, {kinds.count('liveness')} on liveness only, {kinds.count('harness')} in "
             f"the harness; {sum(r['ops'] for r in rows)} ops, {sum(r['faults'] for r in rows)} faults", "",
             "| run | seed | replicas | verdict | ops | faults | worst majority write gap (s) | load start/end |",
             "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        load = r["load"] or {}
        lines.append(f"| {i} | {r['seed']} | {r['replicas']} | {_verdict(r)} | {r['ops']} | {r['faults']} | "
                     f"{r['worst_gap']} | {load.get('start', '-')}/{load.get('end', '-')} |")
    return "\n".join(lines)


def _write(out: str, rows: list[dict]) -> str:
    text = render(rows)
    with open(os.path.join(out, "campaign.txt"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "campaign.json"), "w") as f:
        json.dump(rows, f, indent=2)
        f.write("\n")
    _plot(os.path.join(out, "campaign.png"), rows)
    return text


def _plot(path: str, rows: list[dict]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 6), sharex=True)
    xs = range(1, len(rows) + 1)
    colors = ["#2ca02c" if _counts_as_pass(r) else "#d62728" for r in rows]
    ax1.bar(xs, [r["worst_gap"] or 0 for r in rows], color=colors)
    ax1.axhline(2.0, color="black", linestyle="--", linewidth=1, label="limit (2 s)")
    ax1.set_ylabel("worst majority\nwrite gap (s)")
    ax1.legend(loc="upper right", fontsize=8)
    ax2.bar(xs, [r["ops"] for r in rows], color=colors)
    ax2.set_ylabel("ops")
    ax2.set_xlabel("run (green: pass, red: fail)")
    fig.suptitle(f"raftmesh chaos campaign: {len(rows)} runs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="raftmesh chaos campaign")
    add_arguments(p)
    sys.exit(main(p.parse_args()))
