"""Old code and new side by side in one benchmark run (`--baseline TREE`).

On a machine shared with other work, absolute numbers move with its load from one minute to
the next (docs/benchmarks.md), so a change is judged by the ratio to the code it replaces
measured in the same window. TREE is another checkout of raftmesh (for instance `git
worktree add /tmp/base main`); the benchmark runs there first, in a child process whose
replicas and light agents import that tree (through PYTHONPATH, ahead of this install),
then here, with the same arguments.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile


def run(tree: str, argv: list[str], out_dir: str, timeout: float) -> dict:
    """`raftmesh bench <argv...>` on the code in `tree`, its output under out_dir/baseline;
    returns its JSON result (RuntimeError if it wrote none)."""
    tree = os.path.abspath(tree)
    if not os.path.isfile(os.path.join(tree, "cluster", "netmap_feed.py")):
        raise RuntimeError(f"--baseline {tree}: not a raftmesh checkout (no cluster/netmap_feed.py)")
    out = os.path.join(out_dir, "baseline")
    with tempfile.TemporaryDirectory(prefix="raftmesh-baseline-") as link_dir:
        os.symlink(tree, os.path.join(link_dir, "raftmesh"))
        env = dict(os.environ, PYTHONPATH=link_dir)
        print(f"baseline: the same benchmark on {tree}", flush=True)
        subprocess.run([sys.executable, "-m", "raftmesh.cli.main", "bench", *argv, "--out", out],
                       env=env, timeout=timeout, check=False)
    path = os.path.join(out, f"{argv[0]}.json")
    if not os.path.exists(path):
        raise RuntimeError(f"the baseline run wrote no {path}")
    with open(path) as f:
        return json.load(f)


def plot_bars(out_dir: str, name: str, title: str, unit: str,
              groups: dict[str, dict[str, float]]) -> str:
    """Grouped bars: one group per label of `groups` (e.g. "before", "after"), one bar per
    key of its values (e.g. a thread), the same keys in every group."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted({k for values in groups.values() for k in values})
    fig, ax = plt.subplots(figsize=(8, 5))
    width = 0.8 / max(1, len(groups))
    for i, (label, values) in enumerate(groups.items()):
        xs = [j + i * width for j in range(len(keys))]
        bars = ax.bar(xs, [values.get(k, 0.0) for k in keys], width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks([j + width * (len(groups) - 1) / 2 for j in range(len(keys))], keys)
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
