"""A benchmark's scratch directory: its replicas' data and logs, and its workers' logs.

Removed when the run ends well; kept, and its path printed, when it does not (an exception,
a failed round, Ctrl-C, SIGTERM: chaos/cli.py turns SIGTERM into SystemExit, so the benches'
`finally` blocks run), so what went wrong can be read afterwards.
"""
from __future__ import annotations

import shutil
import tempfile


class WorkDir:
    def __init__(self, bench: str):
        self.path = tempfile.mkdtemp(prefix=f"raftmesh-bench-{bench}-")

    def close(self, ok: bool, why: str = "") -> None:
        """Last in the bench's `finally`, after its processes are stopped."""
        if ok:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            print(f"{why or 'the run did not finish'}; logs kept in {self.path}", flush=True)
