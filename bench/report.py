"""Shared output of benchmarks: progress lines, a printed table, JSON and PNG plots."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Callable


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal's).
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_interval(values: list[float]) -> tuple[float, float, float] | None:
    """(mean, low, high): the 95% confidence interval of the mean of repeated measurements,
    so "at parity" or "above" can be told from noise. None for fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    half = (_T95[n - 2] if n - 1 <= len(_T95) else 1.96) * sd / n ** 0.5
    return mean, mean - half, mean + half


def summarize(latencies: list[float]) -> dict:
    s = sorted(latencies)
    return {"n": len(s), "p50_ms": percentile(s, 0.5) * 1e3, "p99_ms": percentile(s, 0.99) * 1e3,
            "max_ms": (s[-1] * 1e3) if s else float("nan"),
            "mean_ms": (sum(s) / len(s) * 1e3) if s else float("nan")}


def machine(load_at_start: tuple | None = None) -> dict:
    """Where and when the numbers were taken. Given the load averages at a run's start, also
    the 1-minute load at its start and end: the replicas, the agents and anything else
    running share this machine's CPUs."""
    out = {"cpus": os.cpu_count(), "python": platform.python_version(),
           "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if load_at_start is not None:
        out.update(loadavg_1m_start=load_at_start[0], loadavg_1m_end=os.getloadavg()[0])
    return out


class Progress:
    """One line that rewrites itself on a terminal, plain lines otherwise."""

    def __init__(self, label: str):
        self.label, self.tty, self.last = label, sys.stderr.isatty(), 0.0

    def update(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < (0.2 if self.tty else 2.0):
            return
        self.last = now
        line = f"[{self.label}] {text}"
        sys.stderr.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    from tabulate import tabulate
    print(f"\n{title} (machine: {os.cpu_count()} CPUs)")
    print(tabulate([[_fmt(r.get(c)) for c in columns] for r in rows], headers=columns))


def print_p99_targets(targets: list[dict], where) -> None:
    """One verdict line per target {"target_p99_s", "p99_s", "met"}; `where(t)` names it
    (e.g. " (real)" or " at 1000 agents")."""
    for t in targets:
        print(f"target p99 <= {t['target_p99_s']:g} s{where(t)}: {t['p99_s'] * 1e3:.0f} ms -> "
              f"{'met' if t['met'] else 'MISSED'}")


def _fmt(v):
    return f"{v:.2f}" if isinstance(v, float) else v


def write_json(out_dir: str, name: str, data: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    return path


def save(out_dir: str, name: str, result: dict, plot: Callable[[], str]) -> None:
    """<name>.json (the result as it stands, without these paths), then the plot (`plot`
    draws it and returns its path); both paths go into `result` and are printed."""
    result["json"] = write_json(out_dir, name, result)
    result["plot"] = plot()
    print(f"results: {result['json']}, plot: {result['plot']}")


def plot_cdfs(out_dir: str, name: str, title: str, series: dict[str, list[float]]) -> str:
    """Latency CDFs (milliseconds, log x) of several series in one PNG."""
    fig, ax = _axes()
    for label, values in series.items():
        s = sorted(v * 1e3 for v in values)
        if s:
            ax.plot(s, [(i + 1) / len(s) for i in range(len(s))], label=f"{label} (n={len(s)})")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of operations")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save_figure(fig, out_dir, name)


def plot_bars(out_dir: str, name: str, title: str, unit: str,
              groups: dict[str, dict[str, float]]) -> str:
    """Grouped bars: one group per label of `groups` (e.g. "baseline", "this"), one bar per
    key of its values (e.g. a thread), the same keys in every group."""
    keys = sorted({k for values in groups.values() for k in values})
    fig, ax = _axes()
    width = 0.8 / max(1, len(groups))
    for i, (label, values) in enumerate(groups.items()):
        bars = ax.bar([j + i * width for j in range(len(keys))],
                      [values.get(k, 0.0) for k in keys], width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks([j + width * (len(groups) - 1) / 2 for j in range(len(keys))], keys)
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    return save_figure(fig, out_dir, name)


def _axes():
    import matplotlib
    matplotlib.use("Agg")  # off-screen
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=(8, 5))


def save_figure(fig, out_dir: str, name: str) -> str:
    """Every benchmark's PNG the same way (`<out_dir>/<name>.png`), its figure freed."""
    import matplotlib.pyplot as plt
    path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
