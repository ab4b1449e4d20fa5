"""Admin subcommands of `raftmesh` (users, nodes, keys, apikeys, policy, audit, cluster).

Thin over cli/api_client.py: each command is one or a few API calls plus a human rendering;
`--json` prints the server's answer untouched so scripts see exactly the documented shape.
Exit codes: 0 ok, 1 the server (or the audit chain) said no, 2 usage or client configuration.
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import re
import stat
import sys
import time
import tomllib
from typing import Any, Callable, Iterable, Iterator

from raftmesh.api.auth import SCOPES
from raftmesh.cli.api_client import Client, ClientError, split_servers

DEFAULT_CONFIG = "~/.config/raftmesh/client.toml"
AUDIT_PAGE = 1000  # the server's maximum page size
TRANSIENT = ("unreachable", "not_ready", "no_leader")
CODE_NOTES = {
    "outcome_unknown": "the write may or may not have happened; check the current state "
                       "(list/get) before retrying",
    "no_leader": "the write was NOT applied; it is safe to retry",
    "not_ready": "no replica could confirm the latest state; retry, or pass --stale",
    "unauthenticated": "check --api-key / RAFTMESH_API_KEY / the api_key in the client config",
}


class UsageError(Exception):
    """Bad client configuration or arguments argparse cannot check (exit 2)."""


# -- entry points -----------------------------------------------------------------------------
def register(parser: argparse.ArgumentParser, sub) -> None:
    """Add the global client options to `parser` and the admin command groups to `sub`."""
    _global_options(parser, default=None)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, default=argparse.SUPPRESS)  # also accepted after the subcommand
    for add in (_users, _nodes, _routes, _keys, _apikeys, _policy, _dns, _lifecycle, _audit,
                _cluster):
        add(sub, common)


def _global_options(p: argparse.ArgumentParser, default) -> None:
    g = p.add_argument_group("admin client options")
    g.add_argument("--server", default=default, metavar="URL[,URL...]",
                   help="admin API URL(s) of any replicas, tried in order (env RAFTMESH_SERVER)")
    g.add_argument("--api-key", default=default, metavar="KEY",
                   help="API key (env RAFTMESH_API_KEY; prefer either over argv, which ps shows)")
    g.add_argument("--client-config", default=default, metavar="FILE",
                   help=f"TOML with `server` and `api_key` (default {DEFAULT_CONFIG})")
    g.add_argument("--json", action="store_true", default=default,
                   help="print the raw JSON answer")


def _command(fn: Callable[["Run"], int | None]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command: resolve settings, map errors to messages and exit codes."""
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(Run(args, make_client(args))) or 0
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except ClientError as e:
            return report_error(e)
        except BrokenPipeError:  # e.g. `| head`: stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except KeyboardInterrupt:
            return 130
    return run


def report_error(e: ClientError) -> int:
    print(f"error: {e.code}: {e.message}", file=sys.stderr)
    if e.code in CODE_NOTES:
        print(f"note: {CODE_NOTES[e.code]}", file=sys.stderr)
    return 1


class Run:
    """What a command needs: its arguments, a client and the chosen output form."""

    def __init__(self, args: argparse.Namespace, client: Client):
        self.args, self.client, self.json = args, client, bool(getattr(args, "json", False))

    def show(self, answer: Any, human: Callable[[Any], None]) -> None:
        if self.json:
            print_json(answer)
        else:
            human(answer)

    def read(self, path: str, **query) -> Any:
        return self.client.get(path, stale=getattr(self.args, "stale", False), **query)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


# -- settings: flags > env > config file --------------------------------------------------------
def make_client(args: argparse.Namespace, environ=os.environ) -> Client:
    servers, key = resolve_settings(args, environ)
    return Client(servers, key)


def resolve_settings(args: argparse.Namespace, environ=os.environ) -> tuple[list[str], str]:
    path = args.client_config or os.path.expanduser(DEFAULT_CONFIG)
    config = load_config(path, required=bool(args.client_config))
    servers = split_servers(args.server or environ.get("RAFTMESH_SERVER") or config.get("server"))
    if not servers:
        raise UsageError("no server: pass --server URL[,URL...], set RAFTMESH_SERVER or put "
                         f"`server = \"...\"` in {path}")
    key = args.api_key or environ.get("RAFTMESH_API_KEY") or config_key(path, config)
    if not key:
        raise UsageError(f"no API key: pass --api-key, set RAFTMESH_API_KEY or put "
                         f"`api_key = \"...\"` in {path} (mode 0600)")
    return servers, key


def load_config(path: str, required: bool) -> dict:
    try:
        with open(path, "rb") as f:
            config = tomllib.load(f)
    except FileNotFoundError:
        if required:
            raise UsageError(f"client config {path} does not exist")
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"cannot read client config {path}: {e}")
    unknown = sorted(set(config) - {"server", "api_key"})
    if unknown:
        raise UsageError(f"client config {path}: unknown settings {unknown} (known: server, api_key)")
    return config


def config_key(path: str, config: dict) -> str | None:
    """The file's api_key, refused if anyone but the owner could read it."""
    if not config.get("api_key"):
        return None
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise UsageError(f"refusing to read api_key from {path}: it is accessible by group or "
                         f"others (mode {mode:04o}); run `chmod 600 {path}`")
    return str(config["api_key"])


# -- argument types -----------------------------------------------------------------------------
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> int:
    """Seconds, or a number with a unit: 90, 90s, 15m, 24h, 7d, 2w."""
    m = re.fullmatch(r"(\d+)([smhdw]?)", text.strip())
    if not m or int(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration (e.g. 3600, 15m, 24h, 7d)")
    return int(m.group(1)) * _UNITS[m.group(2) or "s"]


def when(text: str) -> float:
    """Unix seconds, ISO 8601 (UTC unless an offset is given), or a duration ago (15m, 2d)."""
    try:
        return float(text)
    except ValueError:
        pass
    if re.fullmatch(r"\d+[smhdw]", text.strip()):
        return time.time() - duration(text)
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time (unix seconds, ISO 8601, "
                                         "or e.g. 2h for two hours ago)")
    return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp()


def tag(text: str) -> str:
    return text if text.startswith("tag:") else "tag:" + text


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


# -- rendering ----------------------------------------------------------------------------------
def fmt_time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def ago(ts: float | None, now: float | None = None) -> str:
    if ts is None:
        return "never"
    secs = max(0, int((now or time.time()) - ts))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit} ago"
    return f"{secs}s ago"


def fmt_expiry(ts: float | None, expired: bool = False) -> str:
    if expired or (ts is not None and ts <= time.time()):
        return "expired"
    return "never" if ts is None else fmt_time(ts)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "-"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def table(rows: list[list], headers: list[str], empty: str) -> None:
    if not rows:
        print(f"({empty})")
        return
    from tabulate import tabulate
    print(tabulate([[fmt(c) for c in r] for r in rows], headers=headers, tablefmt="simple",
                   disable_numparse=True))


def record(rec: dict, times: Iterable[str] = ("created_at", "expires_at", "last_seen")) -> None:
    """One record as a two-column field/value table."""
    from tabulate import tabulate
    rows = [[k, fmt_time(v) if k in times and v is not None else fmt(v)] for k, v in rec.items()]
    print(tabulate(rows, tablefmt="plain", disable_numparse=True))


def done(verb: str, what: str, answer: dict) -> None:
    version = answer.get("version")
    print(f"{verb} {what}" + (f" (version {version})" if version is not None else ""))


def secret_note(kind: str) -> None:
    print(f"note: this {kind} is shown only once; store it now (the cluster keeps only its hash)",
          file=sys.stderr)


# -- parser helpers ------------------------------------------------------------------------------
def _group(sub, name: str, help: str):
    p = sub.add_parser(name, help=help)
    return p.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")


def _leaf(group, name: str, fn, help: str, common, read: bool = False) -> argparse.ArgumentParser:
    p = group.add_parser(name, help=help, description=help, parents=[common])
    if read:
        p.add_argument("--stale", action="store_true",
                       help="answer from the contacted replica's local state (no read barrier)")
    p.set_defaults(func=_command(fn))
    return p


# -- users ---------------------------------------------------------------------------------------
def _users(sub, common) -> None:
    g = _group(sub, "users", "manage users")
    _leaf(g, "list", users_list, "list users", common, read=True)
    p = _leaf(g, "create", users_create, "create a user", common)
    p.add_argument("name")
    p.add_argument("--display-name")
    p = _leaf(g, "get", users_get, "show a user", common, read=True)
    p.add_argument("name")
    p = _leaf(g, "delete", users_delete, "delete a user (must own no nodes; its pre-auth keys "
              "go too)", common)
    p.add_argument("name")
    p = _leaf(g, "lock", users_lock, "lock a user: revoke every device and key of theirs at once, "
              "refuse them until unlocked", common)
    p.add_argument("name")
    p.add_argument("--reason", required=True, help="why (kept in the audit log)")
    p = _leaf(g, "unlock", users_unlock, "unlock a user (their devices sign in again)", common)
    p.add_argument("name")


def users_list(run: Run) -> None:
    run.show(run.read("/users"), lambda a: table(
        [[u["name"], u.get("display_name"), fmt_time(u.get("created_at"))] for u in a["users"]],
        ["name", "display name", "created"], "no users"))


def users_create(run: Run) -> None:
    body = {"name": run.args.name}
    if run.args.display_name:
        body["display_name"] = run.args.display_name
    run.show(run.client.post("/users", body), lambda a: done("created user", a["user"]["name"], a))


def users_get(run: Run) -> None:
    run.show(run.read(f"/users/{_seg(run.args.name)}"), lambda a: record(a["user"]))


def users_delete(run: Run) -> None:
    run.show(run.client.delete(f"/users/{_seg(run.args.name)}"),
             lambda a: done("deleted user", run.args.name, a))


def users_lock(run: Run) -> None:
    answer = run.client.post(f"/users/{_seg(run.args.name)}/lock", {"reason": run.args.reason})
    run.show(answer, lambda a: done(f"locked user {run.args.name}; revoked",
                                    f"{len(a['revoked'])} device(s)", a))


def users_unlock(run: Run) -> None:
    run.show(run.client.post(f"/users/{_seg(run.args.name)}/unlock"),
             lambda a: done("unlocked user", run.args.name, a))


def _seg(value: str) -> str:
    """A path segment, escaped so an odd name cannot reach another route."""
    from urllib.parse import quote
    return quote(value, safe="")


# -- nodes ---------------------------------------------------------------------------------------
def _nodes(sub, common) -> None:
    g = _group(sub, "nodes", "manage nodes")
    p = _leaf(g, "list", nodes_list, "list nodes", common, read=True)
    p.add_argument("--user")
    p.add_argument("--tag", type=tag)
    p = _leaf(g, "get", nodes_get, "show a node", common, read=True)
    p.add_argument("id")
    p = _leaf(g, "rename", nodes_rename, "rename a node", common)
    p.add_argument("id")
    p.add_argument("name")
    p = _leaf(g, "tag", nodes_tag, "replace a node's tags (tagged nodes belong to no user)", common)
    p.add_argument("id")
    p.add_argument("tags", nargs="*", type=tag, metavar="TAG", help="tag:NAME (the prefix is optional)")
    p.add_argument("--clear", action="store_true", help="remove all tags (the node returns to its user)")
    for name, help in (("expire", "expire a node's key now"), ("delete", "delete a node"),
                       ("unlock", "unlock a locked node (it re-authenticates)")):
        _leaf(g, name, nodes_action, help, common).add_argument("id")
    p = _leaf(g, "approve", nodes_action, "approve a pending node", common)
    p.add_argument("id")
    p.add_argument("--user", help="the user the node belongs to from now on")
    p = _leaf(g, "lock", nodes_lock, "lock a node: revoke it, refuse its machine until unlocked",
              common)
    p.add_argument("id")
    p.add_argument("--reason", required=True, help="why (kept in the audit log)")
    p = _leaf(g, "key-expiry", nodes_key_expiry, "exempt a node (a server) from key expiry, or "
              "end the exemption", common)
    p.add_argument("id")
    p.add_argument("setting", choices=("disable", "enable"))
    p = _leaf(g, "routes", nodes_routes, "set which advertised routes are approved", common)
    p.add_argument("id")
    p.add_argument("cidrs", nargs="*", metavar="CIDR")
    p.add_argument("--clear", action="store_true", help="approve no routes")


def node_rows(nodes: list[dict]) -> list[list]:
    now = time.time()
    return [[n["id"], n["name"], n.get("user") or fmt(n.get("tags")), n.get("ipv4"),
             n.get("approved"), _presence(n), ago(n.get("last_seen"), now),
             fmt_expiry(n.get("key_expiry"), n.get("expired", False))] for n in nodes]


def _presence(n: dict) -> str:
    """online@replica v<acked version>, or offline."""
    if not n.get("online"):
        return "offline"
    s = n.get("stream") or {}
    acked = s.get("acked_version")
    return f"online@{n.get('stream_replica')}" + (f" v{acked}" if acked is not None else "")


NODE_HEADERS = ["id", "name", "user/tags", "ipv4", "approved", "stream", "last seen", "expiry"]


def nodes_list(run: Run) -> None:
    run.show(run.read("/nodes", user=run.args.user, tag=run.args.tag),
             lambda a: table(node_rows(a["nodes"]), NODE_HEADERS, "no nodes"))


def nodes_get(run: Run) -> None:
    run.show(run.read(f"/nodes/{_seg(run.args.id)}"),
             lambda a: record(a["node"], ("created_at", "last_seen", "key_expiry")))


def _show_node(run: Run, answer: dict, verb: str) -> None:
    run.show(answer, lambda a: (done(verb, f"node {a['node']['id']}", a),
                                table(node_rows([a["node"]]), NODE_HEADERS, "")))


def nodes_rename(run: Run) -> None:
    _show_node(run, run.client.patch(f"/nodes/{_seg(run.args.id)}", {"name": run.args.name}), "renamed")


def nodes_tag(run: Run) -> None:
    _one_of(run.args.tags, run.args.clear, "give TAG... or --clear")
    _show_node(run, run.client.patch(f"/nodes/{_seg(run.args.id)}", {"tags": run.args.tags}), "tagged")


def nodes_routes(run: Run) -> None:
    _one_of(run.args.cidrs, run.args.clear, "give CIDR... or --clear")
    answer = run.client.put(f"/nodes/{_seg(run.args.id)}/routes", {"approved_routes": run.args.cidrs})
    run.show(answer, lambda a: done("approved routes " + fmt(a["node"]["approved_routes"]) + " on",
                                    f"node {a['node']['id']}", a))


def nodes_key_expiry(run: Run) -> None:
    answer = run.client.put(f"/nodes/{_seg(run.args.id)}/key-expiry",
                            {"disabled": run.args.setting == "disable"})
    _show_node(run, answer, f"key expiry {run.args.setting}d for")


def _routes(sub, common) -> None:
    g = _group(sub, "routes", "subnet routes and exit nodes")
    _leaf(g, "list", routes_list, "each route's primary router and candidates", common, read=True)


def routes_list(run: Run) -> None:
    def rows(a: dict) -> list[list]:
        return [[r["cidr"], "exit node" if r.get("exit_node") else r["primary"] or "-",
                 " ".join(c["id"] + ("" if c["eligible"] else " (down)") for c in r["candidates"])]
                for r in a["routes"]]
    run.show(run.read("/routes"), lambda a: table(rows(a), ["cidr", "primary", "routers"],
                                                  "no routes"))


def _one_of(values: list, clear: bool, message: str) -> None:
    """Emptying tags or routes must be asked for explicitly, never by forgetting arguments."""
    if bool(values) == bool(clear):
        raise UsageError(message)


def nodes_action(run: Run) -> None:
    action, path = run.args.nodes_command, f"/nodes/{_seg(run.args.id)}"
    if action == "delete":
        run.show(run.client.delete(path), lambda a: done("deleted", f"node {run.args.id}", a))
    elif action == "approve" and run.args.user:
        _show_node(run, run.client.post(f"{path}/approve", user=run.args.user), "approved")
    else:
        _show_node(run, run.client.post(f"{path}/{action}"), action.removesuffix("e") + "ed")


def nodes_lock(run: Run) -> None:
    _show_node(run, run.client.post(f"/nodes/{_seg(run.args.id)}/lock", {"reason": run.args.reason}),
               "locked")


# -- pre-auth keys -------------------------------------------------------------------------------
def _keys(sub, common) -> None:
    g = _group(sub, "keys", "manage pre-auth keys (node registration)")
    p = _leaf(g, "list", keys_list, "list pre-auth keys", common, read=True)
    p.add_argument("--user")
    p = _leaf(g, "create", keys_create, "create a pre-auth key (printed once)", common)
    p.add_argument("--user", required=True)
    p.add_argument("--reusable", action="store_true")
    p.add_argument("--ephemeral", action="store_true", help="nodes registered with it are ephemeral")
    p.add_argument("--expiration", type=duration, metavar="SECONDS",
                   help="lifetime: seconds or 15m/24h/7d (server default 1h)")
    p.add_argument("--usage-limit", type=positive_int, metavar="N", help="reusable keys only")
    p.add_argument("--tag", dest="tags", action="extend", nargs="+", type=tag, default=[],
                   metavar="TAG", help="tags for nodes registered with the key (needs admin)")
    p = _leaf(g, "delete", keys_delete, "revoke a pre-auth key", common)
    p.add_argument("id")


def key_status(k: dict) -> str:
    from raftmesh.cluster.state_machine import preauth_key_problem
    return preauth_key_problem(k, time.time()) or "valid"


def key_usage(k: dict) -> str:
    limit = k.get("usage_limit") or ("unlimited" if k.get("reusable") else 1)
    return f"{k.get('used', 0)}/{limit}"


def keys_list(run: Run) -> None:
    run.show(run.read("/preauth-keys", user=run.args.user), lambda a: table(
        [[k["id"], k["user"], k.get("reusable"), k.get("ephemeral"),
          key_usage(k),
          k.get("tags"), fmt_expiry(k.get("expires_at")), key_status(k)] for k in a["preauth_keys"]],
        ["id", "user", "reusable", "ephemeral", "used", "tags", "expires", "status"], "no pre-auth keys"))


def keys_create(run: Run) -> None:
    a = run.args
    body = {"user": a.user, "reusable": a.reusable, "ephemeral": a.ephemeral}
    body.update({k: v for k, v in (("expiration_seconds", a.expiration), ("usage_limit", a.usage_limit),
                                   ("tags", a.tags)) if v})
    answer = run.client.post("/preauth-keys", body)
    run.show(answer, lambda r: (done("created pre-auth key", f"{r['preauth_key']['id']} for user "
                                     f"{r['preauth_key']['user']}", r), print(r["key"])))
    secret_note("pre-auth key")


def keys_delete(run: Run) -> None:
    run.show(run.client.delete(f"/preauth-keys/{_seg(run.args.id)}"),
             lambda a: done("revoked pre-auth key", run.args.id, a))


# -- API keys ------------------------------------------------------------------------------------
def _apikeys(sub, common) -> None:
    g = _group(sub, "apikeys", "manage admin API keys (needs an admin key)")
    _leaf(g, "list", apikeys_list, "list API keys", common, read=True)
    p = _leaf(g, "create", apikeys_create, "create an API key (printed once)", common)
    p.add_argument("name")
    p.add_argument("--scope", dest="scopes", action="extend", nargs="+", choices=SCOPES, required=True,
                   help="admin: everything; operator: read+write; read; audit; scim: /scim/v2 only "
                   "(repeatable)")
    p.add_argument("--expiration", type=duration, metavar="SECONDS", help="default: never expires")
    p = _leaf(g, "delete", apikeys_delete, "delete an API key", common)
    p.add_argument("id")


def apikeys_list(run: Run) -> None:
    run.show(run.read("/api-keys"), lambda a: table(
        [[k["id"], k["name"], k.get("scopes"), fmt_time(k.get("created_at")),
          fmt_expiry(k.get("expires_at")), k.get("created_by")] for k in a["api_keys"]],
        ["id", "name", "scopes", "created", "expires", "created by"], "no API keys"))


def apikeys_create(run: Run) -> None:
    body = {"name": run.args.name, "scopes": list(dict.fromkeys(run.args.scopes))}
    if run.args.expiration:
        body["expiration_seconds"] = run.args.expiration
    answer = run.client.post("/api-keys", body)
    run.show(answer, lambda r: (done("created API key", f"{r['api_key']['id']} ({r['api_key']['name']}, "
                                     f"scopes {fmt(r['api_key']['scopes'])})", r), print(r["key"])))
    secret_note("API key")


def apikeys_delete(run: Run) -> None:
    run.show(run.client.delete(f"/api-keys/{_seg(run.args.id)}"),
             lambda a: done("deleted API key", run.args.id, a))


# -- policy --------------------------------------------------------------------------------------
def _policy(sub, common) -> None:
    g = _group(sub, "policy", "read, validate and replace the access policy (HuJSON)")
    _leaf(g, "get", policy_get, "print the current policy text", common, read=True)
    p = _leaf(g, "set", policy_set, "replace the policy (validated by the server first)", common)
    p.add_argument("file", help="policy file, or - for stdin")
    p.add_argument("--expected-version", type=int, metavar="N",
                   help="refuse (version_conflict) unless the current policy version is N")
    p = _leaf(g, "validate", policy_validate, "check a policy without storing it", common)
    p.add_argument("file", help="policy file, or - for stdin")
    _leaf(g, "versions", policy_versions, "list stored policy versions", common, read=True)


def read_text(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}")


def policy_get(run: Run) -> None:
    run.show(run.read("/policy"), lambda a: print(a["policy"]["text"], end="" if
                                                  a["policy"]["text"].endswith("\n") else "\n"))


def policy_set(run: Run) -> None:
    answer = run.client.put("/policy", read_text(run.args.file), expected_version=run.args.expected_version)
    run.show(answer, lambda a: (done("stored policy", f"version {a['policy']['version']}", a),
                                policy_warnings(a)))


def policy_validate(run: Run) -> None:
    run.show(run.client.post("/policy/validate", read_text(run.args.file)),
             lambda a: (print(f"{run.args.file}: policy is valid"), policy_warnings(a)))


def policy_warnings(answer: dict) -> None:
    """What the policy holds that raftmesh does not enforce, one line each on stderr (the
    policy was accepted: these are not errors, but the operator must see them)."""
    for w in answer.get("warnings") or ():
        print(f"warning: {w['path']}: {w['message']} [{w['code']}]", file=sys.stderr)


def policy_versions(run: Run) -> None:
    run.show(run.read("/policy/versions"), lambda a: table(
        [[p["version"], fmt_time(p.get("created_at")), p.get("actor"), p.get("state_version")]
         for p in a["versions"]], ["version", "created", "actor", "state version"], "no policy set"))


# -- audit ---------------------------------------------------------------------------------------
def _audit(sub, common) -> None:
    g = _group(sub, "audit", "read, export and verify the hash-chained audit log (needs audit scope)")
    p = _leaf(g, "list", audit_list, "list audit entries, oldest first", common, read=True)
    p.add_argument("--actor", help="e.g. apikey:<id>, node:<id>, replica:<id>")
    p.add_argument("--target", help="e.g. user:alice, node:<id>")
    p.add_argument("--action", help="e.g. user.create")
    p.add_argument("--since", type=when, help="unix seconds, ISO 8601, or e.g. 2h (ago)")
    p.add_argument("--until", type=when, help="unix seconds, ISO 8601, or e.g. 2h (ago)")
    p.add_argument("--limit", type=positive_int, default=100, help="entries to show (default 100)")
    p.add_argument("--after-seq", type=int, default=0, help="start after this sequence number")
    p = _leaf(g, "export", audit_export, "print entries as JSON lines (verifiable by `audit verify`)",
              common, read=True)
    p.add_argument("--after-seq", type=int, default=0, help="start after this sequence number")
    p.add_argument("--follow", action="store_true", help="keep polling for new entries until Ctrl-C")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls with --follow")
    p = _leaf(g, "verify", audit_verify, "check the hash chain of the live log or of an export FILE; "
              "exit 0 if intact, 1 if not", common, read=True)
    p.add_argument("file", nargs="?", help="JSON-lines export (- for stdin); default: the live log")
    p.add_argument("--partial", action="store_true",
                   help="the file starts mid-log: anchor on its first entry's seq and prev_hash")


def audit_pages(run: Run, after_seq: int, limit: int | None = None, **filters) -> Iterator[dict]:
    """Entries after `after_seq` (up to `limit`), fetched page by page via next_after_seq."""
    remaining = limit
    while remaining is None or remaining > 0:
        want = AUDIT_PAGE if remaining is None else min(AUDIT_PAGE, remaining)
        page = run.read("/audit", after_seq=after_seq, limit=want, **filters)
        yield from page["entries"]
        after_seq = page["next_after_seq"]
        if remaining is not None:
            remaining -= len(page["entries"])
        if len(page["entries"]) < want:  # the server stops early only at the end of the log
            return


AUDIT_HEADERS = ["seq", "time", "actor", "action", "target"]


def audit_list(run: Run) -> None:
    a = run.args
    entries = list(audit_pages(run, a.after_seq, a.limit, actor=a.actor, target=a.target,
                               action=a.action, since=a.since, until=a.until))
    answer = {"entries": entries, "next_after_seq": entries[-1]["seq"] if entries else a.after_seq}
    run.show(answer, lambda r: table([[e["seq"], fmt_time(e["time"]), e["actor"], e["action"], e["target"]]
                                      for e in r["entries"]], AUDIT_HEADERS, "no audit entries"))


def audit_export(run: Run) -> int:
    after = run.args.after_seq
    try:
        while True:
            after = _export_once(run, after)
            if not run.args.follow:
                return 0
            time.sleep(run.args.interval)
    except KeyboardInterrupt:
        return 0


def _export_once(run: Run, after: int) -> int:
    """Print every entry after `after`; returns the last seq printed. With --follow, outages wait."""
    try:
        for e in audit_pages(run, after):
            print(json.dumps(e, sort_keys=True), flush=run.args.follow)
            after = e["seq"]
    except ClientError as e:
        if not run.args.follow or e.code not in TRANSIENT:
            raise
        print(f"warning: {e.code}: {e.message}; retrying", file=sys.stderr)
    return after


def audit_verify(run: Run) -> int:
    try:
        entries = read_export(run.args.file) if run.args.file else audit_pages(run, 0)
        ok, detail, dups = verify_entries(entries, run.args.partial)
    except ExportFormatError as e:
        ok, detail, dups = False, str(e), 0
    source = run.args.file or f"live log via {run.client.last_url or run.client.servers[0]}"
    if dups:
        detail += f" ({dups} re-shipped duplicate entries ignored)"
    if not ok and detail.startswith("entry 1:") and run.args.file and not run.args.partial:
        detail += "; if the export starts mid-log, pass --partial"
    if run.json:
        print_json({"intact": ok, "detail": detail, "source": source})
    else:
        print(f"audit log {'intact' if ok else 'NOT INTACT'}: {detail} [{source}]")
    return 0 if ok else 1


class ExportFormatError(ValueError):
    """A line of an export that is not an audit entry at all (counts as tampering)."""


def read_export(path: str) -> Iterator[dict]:
    f = sys.stdin if path == "-" else _open_export(path)
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                raise ExportFormatError(f"line {n} is not valid JSON")
            if not isinstance(entry, dict):
                raise ExportFormatError(f"line {n} is not a JSON object")
            yield entry


def _open_export(path: str):
    try:
        return open(path, encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e}")


def verify_entries(entries: Iterable[dict], partial: bool = False) -> tuple[bool, str, int]:
    """(intact, verdict, duplicates skipped) using storage.audit_chain.verify.

    Exporters ship at least once, so an entry identical to one already verified (same seq,
    same hash, hash matching its content) is skipped; any other repeat fails the chain.
    """
    from raftmesh.storage.audit_chain import GENESIS, verify
    entries = iter(entries)
    first = next(entries, None)
    if first is None:
        return True, "0 entries verified (empty)", 0
    anchor = (first.get("prev_hash"), first.get("seq")) if partial else (GENESIS, 1)
    dedup = _Dedup()
    ok, detail = verify(dedup.filter(itertools.chain([first], entries)),
                        prev_hash=anchor[0], first_seq=anchor[1])
    return ok, detail, dedup.skipped


class _Dedup:
    def __init__(self):
        self.seen: dict[int, str] = {}
        self.skipped = 0

    def filter(self, entries: Iterable[dict]) -> Iterator[dict]:
        from raftmesh.storage.audit_chain import chain_hash
        for e in entries:
            seq, h = e.get("seq"), e.get("hash")
            if (seq in self.seen and self.seen[seq] == h and isinstance(e.get("prev_hash"), str)
                    and chain_hash(e["prev_hash"], e) == h):
                self.skipped += 1
                continue
            if isinstance(seq, int) and seq not in self.seen:
                self.seen[seq] = h
            yield e


# -- DNS and node lifecycle settings -------------------------------------------------------------
def _dns(sub, common) -> None:
    g = _group(sub, "dns", "MagicDNS: the mesh domain, nameservers and split DNS (docs/dns.md)")
    _leaf(g, "get", dns_get, "show the DNS settings", common, read=True)
    p = _leaf(g, "set", dns_set, "change the DNS settings (what is not given stays)", common)
    p.add_argument("--domain", help="nodes are <hostname>.DOMAIN")
    p.add_argument("--magic-dns", choices=("on", "off"), help="agents answer mesh names")
    p.add_argument("--nameserver", action="append", metavar="IP",
                   help="a resolver for other names (repeatable; replaces the list)")
    p.add_argument("--split", action="append", metavar="DOMAIN=IP[,IP]", type=split_route,
                   help="send names in DOMAIN to these resolvers (repeatable; replaces the map)")
    p.add_argument("--clear-nameservers", action="store_true", help="use each host's own resolvers")
    p.add_argument("--clear-split", action="store_true", help="no split DNS")


def split_route(text: str) -> tuple[str, list[str]]:
    domain, sep, resolvers = text.partition("=")
    if not sep or not domain or not resolvers:
        raise argparse.ArgumentTypeError(f"{text!r} is not DOMAIN=IP[,IP...]")
    return domain, resolvers.split(",")


def dns_get(run: Run) -> None:
    run.show(run.read("/dns"), lambda a: record(a["settings"], ()))


def dns_set(run: Run) -> None:
    a = run.args
    if a.nameserver and a.clear_nameservers or a.split and a.clear_split:
        raise UsageError("give either --nameserver or --clear-nameservers, --split or --clear-split")
    settings = run.client.get("/dns")["settings"]
    if a.domain is not None:
        settings["domain"] = a.domain
    if a.magic_dns is not None:
        settings["magic_dns"] = a.magic_dns == "on"
    if a.nameserver or a.clear_nameservers:
        settings["nameservers"] = a.nameserver or []
    if a.split or a.clear_split:
        settings["split"] = dict(a.split or [])
    run.show(run.client.put("/dns", settings),
             lambda r: (done("stored DNS settings", "", r), record(r["settings"], ())))


def _lifecycle(sub, common) -> None:
    g = _group(sub, "lifecycle", "node lifecycle: when ephemeral nodes are removed")
    _leaf(g, "get", lifecycle_get, "show the lifecycle settings", common, read=True)
    p = _leaf(g, "set", lifecycle_set, "change the lifecycle settings", common)
    p.add_argument("--ephemeral-offline", type=duration, required=True, metavar="DURATION",
                   help="remove an ephemeral node offline this long (e.g. 300, 5m, 1h)")


def lifecycle_get(run: Run) -> None:
    run.show(run.read("/lifecycle"), lambda a: record(a["settings"], ()))


def lifecycle_set(run: Run) -> None:
    answer = run.client.put("/lifecycle", {"ephemeral_offline_seconds": run.args.ephemeral_offline})
    run.show(answer, lambda r: (done("stored lifecycle settings", "", r), record(r["settings"], ())))


# -- cluster -------------------------------------------------------------------------------------
def _cluster(sub, common) -> None:
    g = _group(sub, "cluster", "cluster status and membership")
    _leaf(g, "status", cluster_status, "leader, term and every member's Raft state "
          "(as seen by the contacted replica)", common)
    _leaf(g, "members", cluster_members, "registered members", common, read=True)
    p = _leaf(g, "add", cluster_add, "add a replica (start it with `raftmesh server --join`)", common)
    p.add_argument("id")
    p.add_argument("raft_addr", metavar="RAFT_ADDR", help="host:port")
    p.add_argument("api_url", metavar="API_URL")
    p = _leaf(g, "remove", cluster_remove, "remove a replica", common)
    p.add_argument("id")
    _leaf(g, "snapshot", cluster_snapshot, "snapshot and compact the contacted replica's log "
          "(the first reachable --server)", common)


def cluster_status(run: Run) -> None:
    def human(a: dict) -> None:
        print(f"leader: {a.get('leader') or '-'} ({a.get('leader_raft_addr') or 'none'})  "
              f"term: {fmt(a.get('term'))}  commit index: {fmt(a.get('commit_index'))}  "
              f"quorum: {fmt(a.get('has_quorum'))}")
        table([[m.get("id"), m.get("raft_addr"), m.get("api_url"), m.get("state"), m.get("term"),
                m.get("commit_index"), m.get("applied_version"), m.get("reachable")]
               for m in a["members"]],
              ["id", "raft addr", "api url", "state", "term", "commit", "applied", "reachable"], "no members")
    run.show(run.client.get("/cluster"), human)


def cluster_members(run: Run) -> None:
    run.show(run.read("/cluster/members"), lambda a: table(
        [[m["id"], m["raft_addr"], m["api_url"]] for m in a["members"]],
        ["id", "raft addr", "api url"], "no members"))


def cluster_add(run: Run) -> None:
    a = run.args
    answer = run.client.post("/cluster/members", {"id": a.id, "raft_addr": a.raft_addr, "api_url": a.api_url})
    run.show(answer, lambda r: done("added member", f"{a.id} ({a.raft_addr})", r))


def cluster_remove(run: Run) -> None:
    run.show(run.client.delete(f"/cluster/members/{_seg(run.args.id)}"),
             lambda a: done("removed member", run.args.id, a))


def cluster_snapshot(run: Run) -> None:
    run.show(run.client.post("/cluster/snapshot"),
             lambda a: print(f"snapshot requested on {run.client.last_url}"))
