"""`raftmesh agent up|status|logout|rotate-key`: the node daemon and its local controls."""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

from .resolv_conf import RESOLV_CONF


def register(sub) -> None:
    agent = sub.add_parser("agent", help="the node daemon: join the mesh and keep its tunnels")
    cmds = agent.add_subparsers(dest="agent_command", required=True)

    up = cmds.add_parser("up", help="register (first run), stream the netmap, drive WireGuard")
    up.add_argument("--server", required=True,
                    help="comma-separated replica or load-balancer URLs, tried in turn")
    up.add_argument("--auth-key", help="pre-auth key (or RAFTMESH_AUTH_KEY); without one it "
                    "prints a URL to sign in at (single sign-on), or, on a cluster without SSO, "
                    "the node waits for an admin's approval")
    up.add_argument("--state-dir", required=True, help="keys, registration and cached netmap (0600)")
    up.add_argument("--interface", required=True, help="WireGuard interface name (<= 15 chars)")
    up.add_argument("--hostname", default="")
    up.add_argument("--listen-port", type=int, default=41641)
    up.add_argument("--endpoint", action="append", default=[],
                    help="ip:port peers should reach this node at (default: global IPv4 addresses)")
    up.add_argument("--advertise-route", action="append", default=[], metavar="CIDR",
                    help="a subnet this node routes to (repeatable; an admin or the policy's "
                    "autoApprovers approves it)")
    up.add_argument("--advertise-exit-node", action="store_true",
                    help="offer this node as an exit node (advertises 0.0.0.0/0 and ::/0)")
    up.add_argument("--no-masquerade", dest="masquerade", action="store_false",
                    help="routed traffic keeps the peers' mesh addresses (the subnet routes "
                    "100.64.0.0/10 back to its routers itself)")
    up.add_argument("--exit-node", metavar="PEER",
                    help="reach the internet through this exit node (id, name or mesh address)")
    up.add_argument("--exit-node-allow-lan-access", action="store_true",
                    help="with --exit-node, keep reaching the local networks directly")
    up.add_argument("--stun", action="append", default=[], metavar="HOST_IP:PORT",
                    help="a STUN server to ask besides the replicas (repeatable)")
    up.add_argument("--max-stale", type=float, default=7 * 86400,
                    help="seconds without any verified frame after which the cached netmap is no "
                    "longer enforced (default 7 days; 0 = keep using it)")
    up.add_argument("--no-dns-config", dest="dns_config", action="store_false",
                    help="leave the host's resolver configuration alone (MagicDNS still answers "
                    "on 100.100.100.100)")
    up.add_argument("--resolv-conf", default=RESOLV_CONF,
                    help="the resolver configuration file to point at MagicDNS and restore")
    up.add_argument("--log-level", default="INFO")
    up.set_defaults(func=cmd_up)

    st = cmds.add_parser("status", help="replica in use, netmap version, peers and handshakes")
    st.add_argument("--state-dir", required=True)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    out = cmds.add_parser("logout", help="expire this node's key and stop the running daemon")
    out.add_argument("--state-dir", required=True)
    out.add_argument("--server", required=True)
    out.add_argument("--interface", default="", help="the agent's interface (systemd-resolved hosts)")
    out.add_argument("--resolv-conf", default=RESOLV_CONF)
    out.set_defaults(func=cmd_logout)

    rot = cmds.add_parser("rotate-key", help="ask the running daemon to replace its WireGuard key")
    rot.add_argument("--state-dir", required=True)
    rot.set_defaults(func=cmd_rotate)


def cmd_up(args) -> int:
    from .daemon import Agent, AgentConfig, detect_endpoints
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    servers = [s for s in args.server.split(",") if s]
    try:
        routes = advertised(args)
    except ValueError as e:
        print(f"raftmesh agent: --advertise-route: {e}", file=sys.stderr)
        return 2
    config = AgentConfig(servers=servers, state_dir=args.state_dir, interface=args.interface,
                         auth_key=args.auth_key or os.environ.get("RAFTMESH_AUTH_KEY"),
                         hostname=args.hostname, listen_port=args.listen_port,
                         endpoints=args.endpoint or detect_endpoints(args.listen_port),
                         advertise_routes=routes, max_stale=args.max_stale,
                         stun_servers=args.stun, dns_config=args.dns_config,
                         resolv_conf=args.resolv_conf, masquerade=args.masquerade,
                         exit_node=args.exit_node,
                         exit_node_allow_lan=args.exit_node_allow_lan_access)
    try:
        agent = Agent(config)
    except (OSError, ValueError) as e:
        print(f"raftmesh agent: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, agent.stop)
    signal.signal(signal.SIGINT, agent.stop)
    signal.signal(signal.SIGUSR1, lambda *_: agent.rotate_event.set())
    agent.run()
    return 0


def advertised(args) -> list[str]:
    """The routes to advertise; ValueError naming one that is not a CIDR (host bits zero)."""
    import ipaddress

    from raftmesh.proto.wire import EXIT_ROUTES
    for r in args.advertise_route:
        ipaddress.ip_network(r, strict=True)
    return [*args.advertise_route, *(EXIT_ROUTES if args.advertise_exit_node else ())]


def _status(state_dir: str) -> dict | None:
    try:
        with open(os.path.join(state_dir, "status.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _running(status: dict | None) -> bool:
    if not status or status.get("state") == "stopped":
        return False
    try:
        os.kill(status["pid"], 0)
        return True
    except (OSError, KeyError, TypeError):
        return False


def cmd_status(args) -> int:
    from .wireguard import WireGuardInterface, WireGuardError
    st = _status(args.state_dir)
    if st is None:
        print(f"no agent has run with state dir {args.state_dir}", file=sys.stderr)
        return 1
    running = _running(st)
    handshakes = {}
    if running:
        try:
            handshakes = WireGuardInterface(st["interface"], kernel=False).peer_stats()
        except (WireGuardError, OSError):
            pass
    for p in st["peers"]:
        stats = handshakes.get(p["node_key"])
        p["last_handshake"] = stats.latest_handshake if stats else None
        p["rx_bytes"], p["tx_bytes"] = (stats.rx_bytes, stats.tx_bytes) if stats else (None, None)
    st["running"] = running
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0
    print(f"state:    {st['state']}{'' if running else ' (daemon not running)'}"
          + (f" - {st['error']}" if st.get("error") else ""))
    print(f"replica:  {st.get('replica') or '-'} via {st.get('server') or '-'}")
    print(f"node:     {st.get('node_id')}  {' '.join(st.get('addresses', []))}")
    print(f"version:  {st.get('version')} (enforced {st.get('enforced_version')})")
    now = time.time()
    for p in st["peers"]:
        hs, path = p["last_handshake"], p.get("path") or {}
        via = {"direct": f"direct {path.get('endpoint')}", "relay": f"relay {path.get('replica')}"}
        print(f"  {p['name']:<20} {','.join(p['allowed_ips']):<40} "
              f"{via.get(path.get('kind'), 'no path'):<36} "
              f"handshake {f'{now - hs:.0f}s ago' if hs else 'never'}  "
              f"rx {p['rx_bytes'] or 0} B  tx {p['tx_bytes'] or 0} B")
    return 0


def cmd_logout(args) -> int:
    from raftmesh.proto.routes import LOGOUT

    from .control_client import ControlClient, ControlError
    from .resolv_conf import HostResolver
    from .state_dir import StateDir
    state = StateDir(args.state_dir)
    client = ControlClient([s for s in args.server.split(",") if s], state.machine_key())
    try:
        client.call("POST", LOGOUT, deadline=15)
    except (ControlError, OSError) as e:
        print(f"raftmesh agent logout: {e}", file=sys.stderr)
        return 1
    st = _status(args.state_dir)
    if _running(st):
        os.kill(st["pid"], signal.SIGTERM)
        deadline = time.monotonic() + 20
        while _running(_status(args.state_dir)) and time.monotonic() < deadline:
            time.sleep(0.1)  # bounded wait for the daemon's teardown
    HostResolver(args.state_dir, args.interface, args.resolv_conf).restore()  # if left changed
    if st and st.get("interface"):  # a daemon SIGKILLed earlier could not clean up
        from .forwarding import remove_masquerade
        try:
            remove_masquerade(st["interface"])
        except (OSError, ValueError) as e:
            print(f"raftmesh agent logout: {e}", file=sys.stderr)
    for name in ("netmap.json", "registration.json"):
        try:
            os.unlink(os.path.join(args.state_dir, name))
        except FileNotFoundError:
            pass
    print("logged out: the node key is expired and the local netmap is forgotten")
    return 0


def cmd_rotate(args) -> int:
    st = _status(args.state_dir)
    if not _running(st):
        print("no running agent for this state dir", file=sys.stderr)
        return 1
    os.kill(st["pid"], signal.SIGUSR1)
    return 0
