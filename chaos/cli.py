"""`raftmesh bench ...` and `raftmesh chaos ...` subcommands."""
from __future__ import annotations

import argparse
import importlib
import signal
import sys


def register(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks that print tables and write JSON and PNG plots")
    names = bench.add_subparsers(dest="bench", required=True)
    w = names.add_parser("writes", help="admin API write latency/throughput, side by side with etcd")
    w.add_argument("--seconds", type=float, default=10.0, help="duration of each workload shape")
    w.add_argument("--concurrency", type=int, default=64)
    w.add_argument("--no-etcd", action="store_true", help="skip the etcd comparison")
    w.add_argument("--rounds", type=_count_at_least(1), default=1,
                   help="concurrent rounds per system, alternating raftmesh and etcd")
    w.add_argument("--out", default="bench-out")
    _replicas_argument(w, 1, "raftmesh replicas, and etcd members alike")
    w.set_defaults(func=_cleaned_up_on_sigterm(_writes))
    for name, module, summary, min_replicas in BENCHMARKS:
        p = names.add_parser(name, help=summary)
        mod = importlib.import_module(f"raftmesh.chaos.{module}")
        mod.add_arguments(p)
        if min_replicas:
            _replicas_argument(p, min_replicas, "replicas in the cluster under test")
        p.set_defaults(func=_cleaned_up_on_sigterm(mod.main))
    _register_chaos(sub)


# (name, module, summary, fewest replicas it can run with; None: no cluster). Killing a
# replica leaves a quorum only from 3 up.
BENCHMARKS = [
    ("failover", "bench_failover", "SIGKILL the leader until the first acknowledged write, repeated", 3),
    ("scale", "bench_scale", "CPU per node/policy change of the netmap index at 100-10,000 nodes", None),
    ("propagation", "bench_propagation", "policy change until every agent applied it (light agents)", 1),
    ("revoke", "bench_revoke", "node deleted until its key is gone from every peer (wg show + light agents)", 1),
    ("stream-failover", "bench_stream_failover", "SIGKILL the agents' replica until they hold a current netmap", 3),
    ("stream-memory", "bench_stream_memory", "replica RSS per open agent stream", 1),
    ("connect", "bench_connect", "agent up until its first packet reaches a peer over WireGuard", 1),
]


def _replicas_argument(parser, minimum: int, what: str) -> None:
    why = " (a killed replica must leave a quorum)" if minimum > 1 else ""
    parser.add_argument("--replicas", type=_count_at_least(minimum, why), default=3,
                        help=f"{what} (default 3)")


def _count_at_least(minimum: int, why: str = ""):
    """An argparse type: a whole number >= minimum, or an error naming the problem."""
    def count(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"at least {minimum} needed{why}, got {n}")
        return n
    return count


def _register_chaos(sub) -> None:
    run = importlib.import_module("raftmesh.chaos.run")
    chaos = sub.add_parser("chaos", help="fault injection with checkers (docs/chaos.md)")
    cmds = chaos.add_subparsers(dest="chaos", required=True)
    p = cmds.add_parser("run", help="run a seeded fault schedule against real replicas and check it",
                        description=run.__doc__, formatter_class=_raw_help())
    run.add_arguments(p)
    p.set_defaults(func=_cleaned_up_on_sigterm(run.main))


def _cleaned_up_on_sigterm(main):
    """Benchmarks and chaos runs start replicas, agents, etcd and namespaces, and end them in
    `finally` blocks; Python's default SIGTERM action skips those and leaves them running.
    SIGTERM here raises SystemExit instead, like Ctrl-C.

    The SystemExit can also land inside subprocess.Popen after its fork, before the caller
    holds the Popen (seen once in CI: a replica outlived its bench): so after the cleanup,
    any child process still running is ended by pid as well."""
    def run(args) -> int:
        def terminate(signum, frame):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: let the cleanup finish
            print(f"\n{sys.argv[0]}: SIGTERM, stopping what this run started", file=sys.stderr)
            raise SystemExit(128 + signum)
        signal.signal(signal.SIGTERM, terminate)
        try:
            return main(args)
        except SystemExit:
            _end_children()
            raise
    return run


def _end_children() -> None:
    from .benchlab import child_pids, stop_pid
    for pid in child_pids():
        stop_pid(pid)


def _raw_help():
    return argparse.RawDescriptionHelpFormatter


def _writes(args) -> int:
    from . import bench_writes
    bench_writes.run(args.out, args.seconds, args.concurrency, with_etcd=not args.no_etcd,
                     rounds=args.rounds, replicas=args.replicas)
    return 0
