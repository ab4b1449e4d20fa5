"""The `raftmesh` command: `server`, `dev`, and the admin subcommands (cli/admin.py)."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time


def _add_server(sub) -> None:
    p = sub.add_parser("server", help="run one replica (config file and/or flags)",
                       description="Run one replica. The cluster secret comes from the config "
                       "file or RAFTMESH_CLUSTER_SECRET (never a flag: argv is visible in ps).")
    p.add_argument("--config", help="TOML file with ReplicaConfig settings")
    p.add_argument("--id")
    p.add_argument("--raft-addr", help="host:port for Raft traffic")
    p.add_argument("--peers", help="comma-separated Raft addresses of the other members")
    p.add_argument("--api-host")
    p.add_argument("--api-port", type=int)
    p.add_argument("--api-url", help="URL other replicas and clients use for this replica")
    p.add_argument("--data-dir")
    p.add_argument("--durability", choices=["fsync", "none"])
    p.add_argument("--join", action="store_true", default=None,
                   help="this replica is being added to a running cluster")
    p.add_argument("--audit-export-file")
    p.add_argument("--audit-export-url")
    p.add_argument("--snapshot-min-entries", type=int)
    p.add_argument("--stream-keepalive", type=float, help="map-stream keepalive seconds (<= 15)")
    p.add_argument("--heartbeat", type=float, help="Raft heartbeat period, seconds (default 0.05)")
    p.add_argument("--election-min", type=float,
                   help="shortest Raft election timeout, seconds (default 0.3; > 3 x heartbeat)")
    p.add_argument("--election-max", type=float,
                   help="longest Raft election timeout, seconds (default 0.6; > election-min)")
    p.add_argument("--stun-port", type=int,
                   help="UDP port of this replica's STUN responder (default: the API port number)")
    p.add_argument("--node-key-lifetime", type=float,
                   help="key expiry of newly registered nodes, seconds (0: never)")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=cmd_server)


def cmd_server(args) -> int:
    from raftmesh.cluster.config import ConfigError, ReplicaConfig
    from raftmesh.api.server import run
    from raftmesh.storage.journal import JournalError
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flags = {"id": args.id, "raft_addr": args.raft_addr,
             "peers": [p for p in args.peers.split(",") if p] if args.peers is not None else None,
             "api_host": args.api_host, "api_port": args.api_port, "api_url": args.api_url,
             "data_dir": args.data_dir, "durability": args.durability, "join": args.join,
             "audit_export_file": args.audit_export_file, "audit_export_url": args.audit_export_url,
             "snapshot_min_entries": args.snapshot_min_entries,
             "stream_keepalive": args.stream_keepalive, "node_key_lifetime": args.node_key_lifetime,
             "stun_port": args.stun_port, "heartbeat": args.heartbeat,
             "election_min": args.election_min, "election_max": args.election_max}
    env = {"cluster_secret": os.environ.get("RAFTMESH_CLUSTER_SECRET"),
           "bootstrap_admin_key": os.environ.get("RAFTMESH_BOOTSTRAP_ADMIN_KEY")}
    try:
        if args.config:
            config = ReplicaConfig.from_toml(args.config, **flags, **{k: v for k, v in env.items() if v})
        else:
            missing = [f"--{k.replace('_', '-')}" for k in ("id", "raft_addr") if not flags[k]]
            if missing:
                print(f"raftmesh server: missing {', '.join(missing)} (or --config FILE)", file=sys.stderr)
                return 2
            settings = {k: v for k, v in {**flags, **env}.items() if v is not None}
            settings.setdefault("peers", [])
            config = ReplicaConfig(**settings)
        config.validate()
    except (ConfigError, OSError, ValueError, TypeError) as e:
        print(f"raftmesh server: {e}", file=sys.stderr)
        return 2
    try:
        run(config)
    except JournalError as e:  # a restart would meet the same file (exit 2: not retried)
        print(f"raftmesh server: {e}", file=sys.stderr)
        return 2
    return 0


def _add_dev(sub) -> None:
    p = sub.add_parser("dev", help="run a local multi-replica cluster (on loopback unless --bind) until Ctrl-C")
    p.add_argument("--replicas", type=int, default=None,
                   help="replicas of a new cluster (default 3); one left in --data-dir keeps its own")
    p.add_argument("--data-dir", default="./raftmesh-data")
    p.add_argument("--bind", metavar="ADDR", help="the address every service of the replicas "
                   "(API and relay, STUN, Raft) listens on and cluster.json names (default "
                   "127.0.0.1): e.g. a bridge's address, so agents in network namespaces can join")
    p.set_defaults(func=cmd_dev)


def _bind_problem(addr: str) -> str | None:
    """Why the replicas could not listen on `addr` (None if they can)."""
    import ipaddress
    import socket
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return f"--bind needs an IP address of this host, not {addr!r}"
    with socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET) as s:
        try:
            s.bind((addr, 0))
        except OSError as e:
            return f"cannot listen on {addr}: {e.strerror} (is it an address of this host?)"
    return None


def _dev_cluster(args):
    """The cluster an earlier run left in the data directory, or a new one; (None, error)
    when the directory holds replica data that cannot be resumed."""
    from raftmesh.lab.local_cluster import DESCRIPTION, LocalCluster
    if args.replicas is not None and args.replicas < 1:
        return None, "--replicas must be at least 1"
    problem = _bind_problem(args.bind) if args.bind else None
    if problem:
        return None, problem
    if os.path.exists(os.path.join(args.data_dir, DESCRIPTION)):
        cluster = LocalCluster.resume(args.data_dir)
        if args.replicas not in (None, len(cluster.replicas)):
            return None, (f"{args.data_dir} holds a {len(cluster.replicas)}-replica cluster; drop "
                          f"--replicas to resume it, or choose another --data-dir")
        bound = cluster.replicas[0].host if cluster.replicas else None
        if args.bind and bound != args.bind:
            return None, (f"{args.data_dir} holds a cluster bound to {bound} (its members know "
                          f"each other by address); drop --bind or choose another --data-dir")
        print(f"raftmesh dev: resuming the cluster in {args.data_dir} (same ports and admin key)")
        return cluster, None
    if os.path.isdir(args.data_dir) and any(e.startswith("r") and e[1:].isdigit()
                                            for e in os.listdir(args.data_dir)):
        return None, (f"{args.data_dir} holds replica data but no {DESCRIPTION} (a run stopped "
                      f"before its cluster was ready?); remove it or choose another --data-dir")
    return LocalCluster(args.data_dir, replicas=args.replicas or 3, host=args.bind or "127.0.0.1"), None


def cmd_dev(args) -> int:
    from raftmesh.lab.local_cluster import DESCRIPTION
    cluster, error = _dev_cluster(args)
    if error:
        print(f"raftmesh dev: {error}", file=sys.stderr)
        return 2
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        cluster.start_all()
        try:
            cluster.wait_ready(timeout=60)
        except (RuntimeError, TimeoutError) as e:  # e.g. a resumed port taken meanwhile
            print(f"raftmesh dev: the cluster did not become ready: {e}; see "
                  f"{cluster.data_dir}/r*.log", file=sys.stderr)
            return 1
        path = os.path.join(cluster.data_dir, DESCRIPTION)
        cluster.write_description(path)
        print(f"raftmesh dev: {len(cluster.replicas)} replicas ready")
        for r in cluster.replicas:
            print(f"  {r.id}  api {r.api_url}  raft {r.raft_addr}  pid {r.pid}")
        print(f"admin API key: {cluster.admin_key}")
        print(f"written to {path} (mode 0600); logs in {cluster.data_dir}/r*.log")
        print("try: raftmesh --server " + cluster.replicas[0].api_url +
              " --api-key <key> users create alice")
        print("Ctrl-C stops the cluster.", flush=True)
        while not stop:
            for r in cluster.replicas:
                if not r.alive():
                    print(f"replica {r.id} exited ({r.proc.returncode}); restarting", flush=True)
                    cluster.start(r)
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping replicas", flush=True)
        cluster.stop_all()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raftmesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_server(sub)
    _add_dev(sub)
    from raftmesh.bench import cli as bench_cli
    bench_cli.register(sub)
    from raftmesh.chaos import cli as chaos_cli
    chaos_cli.register(sub)
    from raftmesh.agent import cli as agent_cli
    agent_cli.register(sub)
    from raftmesh.cli import admin as cli_admin
    cli_admin.register(parser, sub)
    from raftmesh.cli import login as cli_login
    cli_login.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
