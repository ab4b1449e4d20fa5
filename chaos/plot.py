"""The run at a glance: latency of every op and throughput per second, fault windows shaded,
each window's longest write gap (chaos/availability.py) drawn as a bar, and with --tunnels
every ping lost in the tunnel (chaos/tunnels.py) as a red tick."""
from __future__ import annotations

import os

from .history import FAIL, OK, UNKNOWN, Operation

COLORS = {"kill": "#d62728", "pause": "#9467bd", "partition": "#ff7f0e", "loss": "#8c564b",
          "latency": "#17becf", "membership": "#2ca02c"}


def plot(path: str, history: list[Operation], timeline: list[dict], title: str,
         gaps: list[dict] = (), tunnel: dict | None = None) -> str | None:
    """Write a PNG; returns its path, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ops = [op for op in history if isinstance(op.process, int)]
    end = max([op.invoke for op in ops] + [op.complete or 0 for op in ops] + [1.0])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(13, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    for status, color, marker in ((OK, "#1f77b4", "."), (FAIL, "#d62728", "x"), (UNKNOWN, "#ff7f0e", "^")):
        pts = [(op.invoke, ((op.complete if op.complete is not None else end) - op.invoke) * 1000)
               for op in ops if op.status == status]
        if pts:
            ax1.scatter(*zip(*pts), s=6 if status == OK else 14, c=color, marker=marker,
                        label=f"{status} ({len(pts)})", alpha=0.7, linewidths=0.8)
    ax1.set_yscale("log")
    ax1.set_ylabel("latency (ms, log)")
    ax1.legend(loc="upper right", fontsize=8)
    bins = int(end) + 1
    for status, color in ((OK, "#1f77b4"), (FAIL, "#d62728"), (UNKNOWN, "#ff7f0e")):
        counts = [0] * bins
        for op in ops:
            if op.status == status:
                counts[int(op.complete if op.complete is not None else op.invoke)] += 1
        ax2.step(range(bins), counts, where="post", color=color, label=status)
    ax2.set_ylabel("ops completed / s")
    ax2.set_xlabel("seconds since the workload started")
    ax2.legend(loc="upper right", fontsize=8)
    for entry in timeline:
        stop = entry["end"] if entry["end"] is not None else end
        for ax in (ax1, ax2):
            ax.axvspan(entry["start"], stop, color=COLORS.get(entry["kind"], "grey"), alpha=0.15)
        ax1.text(entry["start"], 1.01, f"#{entry['index']} {entry['kind']}", transform=ax1.get_xaxis_transform(),
                 fontsize=7, rotation=30, color=COLORS.get(entry["kind"], "grey"))
    top = ax2.get_ylim()[1]
    for g in gaps:
        for which, y, style in (("during", 0.93, "-"), ("after", 0.85, ":")):
            span = g[which]
            if span["seconds"] <= 0:
                continue
            ax2.hlines(top * y, span["from"], span["to"], colors="black", linestyles=style, linewidth=2.5)
            ax2.text(span["from"], top * (y + 0.02), f"{span['seconds']:.1f}s", fontsize=6)
    if gaps:
        ax2.plot([], [], "k-", label="longest write gap on the other replicas")
        ax2.plot([], [], "k:", label="longest write gap after the heal")
        ax2.legend(loc="upper right", fontsize=8)
    if tunnel:
        for at in tunnel["lost_at"]:
            ax1.axvline(at, color="red", linewidth=0.8, alpha=0.8)
        ax1.plot([], [], "r-", label=f"tunnel: {tunnel['lost']} of {tunnel['sent']} pings lost, "
                 f"longest gap {tunnel['longest_gap_s']:.2f}s")
        ax1.legend(loc="upper right", fontsize=8)
    fig.suptitle(title, y=0.995)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
