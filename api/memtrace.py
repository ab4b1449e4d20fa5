"""Opt-in memory tracing of a replica: tracemalloc snapshots and object counts on SIGUSR2.

Off unless the replica starts with RAFTMESH_TRACEMALLOC set (`1`, or a number of frames to
keep per allocation, default 25). Then every SIGUSR2 writes, next to the data directory, in
`<data_dir>.memtrace/`:

- `NNNN.tracemalloc`: a tracemalloc snapshot (`tracemalloc.Snapshot.load` reads it);
- `NNNN.types.json`: live gc-tracked objects by type (count and shallow bytes), the number
  of frozen objects (gc.freeze: api/gc_tuning.py; not in the counts by type), the
  process's VmRSS and the number of map streams open at that moment.

Compare two dumps with `python -m raftmesh.api.memtrace diff A B [--per N]`, where A and B
are the snapshot files (or their numbers in a directory given with --dir) and N divides the
sizes (e.g. the number of streams opened between them). Tracing costs CPU and memory (every
live allocation keeps its traceback): for measurements, not for production.
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import logging
import os
import signal
import sys
import time
import tracemalloc

log = logging.getLogger("raftmesh.memtrace")
ENV = "RAFTMESH_TRACEMALLOC"
DEFAULT_FRAMES = 25


def frames_from_env(value: str | None) -> int:
    """0 (off) unless the variable is set to something other than '' or '0'."""
    if not value or value.strip() in ("0", "false", "no", "off"):
        return 0
    try:
        frames = int(value)
    except ValueError:
        return DEFAULT_FRAMES
    # "1" means on, with the default depth: one frame cannot tell callers apart
    return DEFAULT_FRAMES if frames == 1 else max(2, frames)


def dump_dir(data_dir: str) -> str:
    return os.path.abspath(data_dir).rstrip("/") + ".memtrace"


def vm_rss_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def type_counts() -> dict[str, list[int]]:
    """Type name -> [count, shallow bytes] over the objects the garbage collector tracks
    (containers; str/bytes/int are not tracked and appear only in the tracemalloc part)."""
    gc.collect()
    out: dict[str, list[int]] = {}
    for o in gc.get_objects():
        t = type(o)
        name = f"{t.__module__}.{t.__qualname__}"
        entry = out.get(name)
        if entry is None:
            entry = out[name] = [0, 0]
        entry[0] += 1
        try:
            entry[1] += sys.getsizeof(o)
        except Exception:  # noqa: BLE001 - some extension types refuse
            pass
    return out


class MemTrace:
    """Installed by StreamHub.start when RAFTMESH_TRACEMALLOC asks for it."""

    def __init__(self, data_dir: str, extra=None):
        self.dir = dump_dir(data_dir)
        self.extra = extra  # callable returning a dict recorded with each dump
        self.seq = 0

    def dump(self) -> str:
        os.makedirs(self.dir, exist_ok=True)
        self.seq += 1
        while os.path.exists(os.path.join(self.dir, f"{self.seq:04d}.tracemalloc")):
            self.seq += 1
        base = os.path.join(self.dir, f"{self.seq:04d}")
        started = time.monotonic()
        info = {"time": time.time(), "pid": os.getpid(), "vm_rss_kib": vm_rss_kib()}
        if self.extra is not None:
            info.update(self.extra())
        info["types"] = type_counts()
        # gc.get_objects() skips the permanent generation: garbage frozen there shows only here
        info["frozen_objects"] = gc.get_freeze_count()
        snapshot = tracemalloc.take_snapshot()
        snapshot.dump(base + ".tracemalloc.tmp")
        os.replace(base + ".tracemalloc.tmp", base + ".tracemalloc")
        info["traced_bytes"] = tracemalloc.get_traced_memory()[0]
        info["tracemalloc_overhead_bytes"] = tracemalloc.get_tracemalloc_memory()
        with open(base + ".types.json.tmp", "w") as f:
            json.dump(info, f)
        os.replace(base + ".types.json.tmp", base + ".types.json")
        log.warning("memtrace: wrote %s.tracemalloc and .types.json in %.1fs", base,
                    time.monotonic() - started)
        return base + ".tracemalloc"


def install(data_dir: str, loop, extra=None, env: str | None = None) -> MemTrace | None:
    """Start tracemalloc and dump on SIGUSR2 if the environment asks for it; else None."""
    frames = frames_from_env(os.environ.get(ENV) if env is None else env)
    if not frames:
        return None
    if not tracemalloc.is_tracing():
        tracemalloc.start(frames)
    mt = MemTrace(data_dir, extra)

    def on_signal():
        try:
            mt.dump()
        except Exception:  # noqa: BLE001 - a diagnostic must not take the replica down
            log.exception("memtrace dump failed")
    try:
        loop.add_signal_handler(signal.SIGUSR2, on_signal)
    except (ValueError, RuntimeError, NotImplementedError):  # not the main thread
        log.warning("memtrace: cannot handle SIGUSR2 here; call MemTrace.dump() instead")
    log.warning("memtrace: tracemalloc on (%d frames); SIGUSR2 dumps into %s", frames, mt.dir)
    return mt


# -- reading dumps ---------------------------------------------------------------------------
def _resolve(name: str, directory: str | None) -> str:
    if directory and name.isdigit():
        return os.path.join(directory, f"{int(name):04d}.tracemalloc")
    return name


def _short(filename: str) -> str:
    for marker in ("/site-packages/", "/lib/python3", "/work/main/"):
        i = filename.find(marker)
        if i >= 0:
            return filename[i + len(marker):] if marker != "/lib/python3" else \
                "py/" + filename[i + len(marker):].split("/", 1)[-1]
    return filename


def _frame_text(tb, depth: int) -> str:
    frames = list(tb)[-depth:] if depth else list(tb)
    return " <- ".join(f"{_short(f.filename)}:{f.lineno}" for f in reversed(frames))


def diff(a: str, b: str, per: float = 1.0, group: str = "traceback", depth: int = 6,
         top: int = 30, exclude_tracemalloc: bool = True) -> dict:
    """The largest growths from snapshot `a` to `b` (bytes and blocks divided by `per`) and
    the gc type counts between their .types.json files when present."""
    sa, sb = tracemalloc.Snapshot.load(a), tracemalloc.Snapshot.load(b)
    if exclude_tracemalloc:
        flt = [tracemalloc.Filter(False, tracemalloc.__file__)]
        sa, sb = sa.filter_traces(flt), sb.filter_traces(flt)
    stats = sb.compare_to(sa, group)
    total = sum(s.size_diff for s in stats)
    rows = []
    for s in sorted(stats, key=lambda s: s.size_diff, reverse=True)[:top]:
        rows.append({"bytes": s.size_diff / per, "blocks": s.count_diff / per,
                     "where": _frame_text(s.traceback, depth)})
    out = {"total_bytes": total / per, "top": rows}
    ta, tb = a.replace(".tracemalloc", ".types.json"), b.replace(".tracemalloc", ".types.json")
    if os.path.exists(ta) and os.path.exists(tb):
        with open(ta) as f:
            ja = json.load(f)
        with open(tb) as f:
            jb = json.load(f)
        types = []
        for name, (n, size) in jb["types"].items():
            n0, size0 = ja["types"].get(name, (0, 0))
            if n != n0:
                types.append({"type": name, "count": (n - n0) / per, "bytes": (size - size0) / per})
        types.sort(key=lambda t: t["bytes"], reverse=True)
        out["types"] = types[:top]
        if ja.get("vm_rss_kib") and jb.get("vm_rss_kib"):
            out["rss_kib"] = (jb["vm_rss_kib"] - ja["vm_rss_kib"]) / per
            # tracemalloc's own tables are in VmRSS but not in the traces
            overhead = (jb.get("tracemalloc_overhead_bytes", 0)
                        - ja.get("tracemalloc_overhead_bytes", 0)) / 1024 / per
            out["rss_kib_without_tracing"] = out["rss_kib"] - overhead
        out["streams"] = [ja.get("streams"), jb.get("streams")]
        out["frozen_objects"] = [ja.get("frozen_objects"), jb.get("frozen_objects")]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m raftmesh.api.memtrace")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("diff", help="what grew from snapshot A to B")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("--dir", help="directory of numbered dumps (then A and B may be numbers)")
    d.add_argument("--per", type=float, default=0,
                   help="divide by this (default: the change in open streams, else 1)")
    d.add_argument("--group", default="traceback", choices=["traceback", "lineno", "filename"])
    d.add_argument("--depth", type=int, default=6, help="frames shown per traceback")
    d.add_argument("--top", type=int, default=30)
    d.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    a, b = _resolve(args.a, args.dir), _resolve(args.b, args.dir)
    per = args.per
    if not per:
        try:
            with open(a.replace(".tracemalloc", ".types.json")) as f:
                s0 = json.load(f).get("streams") or 0
            with open(b.replace(".tracemalloc", ".types.json")) as f:
                s1 = json.load(f).get("streams") or 0
            per = float(s1 - s0) if s1 != s0 else 1.0
        except OSError:
            per = 1.0
    out = diff(a, b, per, args.group, args.depth, args.top)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"per {per:g}: traced growth {out['total_bytes']:.0f} B"
          + (f", VmRSS growth {out['rss_kib']:.2f} KiB ({out['rss_kib_without_tracing']:.2f} KiB "
             "without tracemalloc's own tables)" if "rss_kib" in out else ""))
    if out.get("frozen_objects"):
        print("frozen objects (not in the types below): {} -> {}".format(*out["frozen_objects"]))
    for r in out["top"]:
        print(f"{r['bytes']:10.0f} B {r['blocks']:7.2f} blk  {r['where']}")
    for t in out.get("types", []):
        print(f"{t['bytes']:10.0f} B {t['count']:7.2f} obj  {t['type']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
