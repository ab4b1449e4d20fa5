"""`raftmesh login`: sign in to the admin API through the identity provider (single
sign-on, docs/identity.md), for a short-lived API key whose scopes come from IdP groups.

The CLI makes the key's secret itself and sends the replicas only its id and sha256
(api/sso_api.py): the key it then uses never crosses the network before it is used. It is
saved as `api_key` in the client config (mode 0600), next to the server it was made on.
"""
from __future__ import annotations

import os
import secrets
import sys
import time

from raftmesh.api import auth

from .admin import DEFAULT_CONFIG, UsageError, load_config, report_error
from .api_client import Client, ClientError, split_servers

POLL = 2.0


def register(sub) -> None:
    p = sub.add_parser("login", help="sign in through the identity provider (single sign-on)",
                       description=__doc__)
    p.add_argument("--server", metavar="URL[,URL...]", help="admin API URL(s) (env RAFTMESH_SERVER)")
    p.add_argument("--client-config", metavar="FILE",
                   help=f"where to save the key (default {DEFAULT_CONFIG})")
    p.set_defaults(func=cmd_login)


def cmd_login(args) -> int:
    path = args.client_config or os.path.expanduser(DEFAULT_CONFIG)
    try:
        config = load_config(path, required=False)
        servers = split_servers(args.server or os.environ.get("RAFTMESH_SERVER") or config.get("server"))
        if not servers:
            raise UsageError("no server: pass --server URL or set RAFTMESH_SERVER")
        key = _sign_in(Client(servers, None))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ClientError as e:
        return report_error(e)
    except KeyboardInterrupt:
        return 130
    save(path, {**config, "server": ",".join(servers), "api_key": key})
    print(f"signed in; the API key is saved in {path}", file=sys.stderr)
    return 0


def _sign_in(client: Client) -> str:
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    started = client.post("/auth/login", {"key_id": key_id, "key_hash": auth.hash_secret(secret)})
    print(f"To sign in, open:\n\n\t{started['login_url']}\n", file=sys.stderr, flush=True)
    while time.time() < started["login_expires_at"]:
        if client.get(f"/auth/login/{key_id}")["signed_in"]:
            return f"rmk_{key_id}_{secret}"
        time.sleep(POLL)
    raise UsageError("the login expired before you signed in; run `raftmesh login` again")


def save(path: str, config: dict) -> None:
    """Replace the client config atomically, readable by its owner only."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        for name, value in sorted(config.items()):
            f.write(f"{name} = {_toml_string(str(value))}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
