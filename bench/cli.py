"""`raftmesh bench ...`: the benchmarks, each printing a table and writing JSON and PNG plots."""
from __future__ import annotations

import argparse
import functools

from raftmesh.lab.lazy_commands import LazyParser
from raftmesh.lab.processes import cleaned_up_on_sigterm


def register(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks that print tables and write JSON and PNG plots")
    names = bench.add_subparsers(dest="bench", required=True, parser_class=LazyParser)
    w = names.add_parser("writes", help="admin API write latency/throughput, side by side with etcd")
    w.add_argument("--seconds", type=float, default=10.0, help="duration of each workload shape")
    w.add_argument("--concurrency", type=int, default=64)
    w.add_argument("--no-etcd", action="store_true", help="skip the etcd comparison")
    w.add_argument("--rounds", type=_count_at_least(1), default=1,
                   help="concurrent rounds per system, alternating raftmesh and etcd")
    _replicas_argument(w, 1, "raftmesh replicas, and etcd members alike")
    _out_argument(w)
    w.set_defaults(func=cleaned_up_on_sigterm(_writes))
    for name, module, summary, min_replicas in BENCHMARKS:
        p = names.add_parser(name, help=summary, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.module = f"raftmesh.bench.{module}"
        p.after_load = functools.partial(_common_arguments, min_replicas)


def _common_arguments(min_replicas: int | None, parser) -> None:
    if min_replicas:
        _replicas_argument(parser, min_replicas, "replicas in the cluster under test")
    _out_argument(parser)


# (name, module, summary, fewest replicas it can run with; None: no cluster). Killing a
# replica leaves a quorum only from 3 up.
BENCHMARKS = [
    ("failover", "failover", "SIGKILL the leader until the first acknowledged write, repeated", 3),
    ("scale", "scale", "CPU per node/policy change of the netmap index at 100-10,000 nodes", None),
    ("propagation", "propagation", "policy change until every agent applied it (light agents)", 1),
    ("dns-propagation", "dns_propagation", "DNS settings change until every agent applied it (light agents)", 1),
    ("revoke", "revoke", "node deleted until its key is gone from every peer (wg show + light agents)", 1),
    ("lockdown", "lockdown", "user locked (or SCIM-deactivated) until its device is gone from every wg show", 1),
    ("stream-failover", "stream_failover", "SIGKILL the agents' replica until they hold a current netmap", 3),
    ("stream-memory", "stream_memory", "replica RSS per open agent stream", 1),
    ("connect", "connect", "agent up until its first packet reaches a peer, by NAT type, with Nebula", 1),
    ("throughput", "throughput", "iperf3 through direct and relayed tunnels, beside hand-configured wireguard-go", 1),
    ("policy", "policy", "validate and apply an N-rule policy; /healthz latency meanwhile", 1),
    ("route-failover", "route_failover", "SIGKILL an HA subnet router until traffic flows "
     "through the other (real agents)", None),
    ("route-propagation", "route_propagation", "route approval until every agent applied it "
     "(light agents)", 1),
    ("geo", "geo", "replicas in regions a WAN apart: writes, propagation, failovers per region", None),
]


def _replicas_argument(parser, minimum: int, what: str) -> None:
    why = " (a killed replica must leave a quorum)" if minimum > 1 else ""
    parser.add_argument("--replicas", type=_count_at_least(minimum, why), default=3,
                        help=f"{what} (default 3)")


def _out_argument(parser) -> None:
    parser.add_argument("--out", default="bench-out", help="directory for the JSON and PNG files")


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


def _writes(args) -> int:
    from . import writes
    writes.run(args.out, args.seconds, args.concurrency, with_etcd=not args.no_etcd,
                     rounds=args.rounds, replicas=args.replicas)
    return 0
