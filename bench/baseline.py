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

