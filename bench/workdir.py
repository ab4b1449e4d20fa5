"""A benchmark's scratch directory: its replicas' data and logs, and its workers' logs.

Removed when the run ends well; kept, and its path printed, when it does not (an exception,
a failed round, Ctrl-C, SIGTERM: chaos/cli.py turns SIGTERM into SystemExit, so the benches'
`finally` blocks run), so what went wrong can be read afterwards; kept always with
RAFTMESH_BENCH_KEEP=1 (to read the agents' and replicas' logs of a good run).
"""
from __future__ import annotations

import os
import shutil
import tempfile


class WorkDir:
    def __init__(self, bench: str):
        self.path = tempfile.mkdtemp(prefix=f"raftmesh-bench-{bench}-")

    def close(self, ok: bool, why: str = "") -> None:
        """Last in the bench's `finally`, after its processes are stopped."""
        if ok and not os.environ.get("RAFTMESH_BENCH_KEEP"):
            shutil.rmtree(self.path, ignore_errors=True)
        elif ok:
            print(f"logs kept in {self.path} (RAFTMESH_BENCH_KEEP)", flush=True)
        else:
            print(f"{why or 'the run did not finish'}; logs kept in {self.path}", flush=True)
