"""`raftmesh bench ...` (and later `raftmesh chaos ...`) subcommands."""
from __future__ import annotations


def register(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks that print tables and write JSON and PNG plots")
    names = bench.add_subparsers(dest="bench", required=True)
    w = names.add_parser("writes", help="admin API write latency/throughput, side by side with etcd")
    w.add_argument("--seconds", type=float, default=10.0, help="duration of each workload shape")
    w.add_argument("--concurrency", type=int, default=64)
    w.add_argument("--no-etcd", action="store_true", help="skip the etcd comparison")
    w.add_argument("--out", default="bench-out")
    w.set_defaults(func=_writes)


def _writes(args) -> int:
    from . import bench_writes
    bench_writes.run(args.out, args.seconds, args.concurrency, with_etcd=not args.no_etcd)
    return 0
