"""JSON schemas of the API's answers, for the OpenAPI document: clients and tools
(schemathesis in tests/test_schemathesis.py) check every response against them.

A record lists the fields a client may rely on; the server may add fields later, so
objects here do not forbid others. Errors share one schema (errors.py).
"""
from __future__ import annotations

from .errors import ERROR_CODES

STR = {"type": "string"}
BOOL = {"type": "boolean"}
VERSION = {"type": "integer", "minimum": 0}
TIME = {"type": "number"}
ANY_OBJECT = {"type": "object"}


def answer(required: dict, optional: dict | None = None) -> dict:
    return {"type": "object", "properties": {**required, **(optional or {})},
            "required": list(required)}


def nullable(schema: dict) -> dict:
    return {**schema, "type": [schema["type"], "null"]}


USER = answer({"name": STR})
NODE = answer({"id": STR, "name": STR}, {
    "exit_node": {"type": ["string", "null"], "description": "the exit node (id) the node's "
                  "agent reports sending its internet traffic through; null or absent: none"}})
PREAUTH_KEY = answer({"id": STR, "user": STR})
API_KEY = answer({"id": STR, "name": STR, "scopes": {"type": "array", "items": STR}})
MEMBER = answer({"id": STR})
POLICY_VERSION = answer({"version": VERSION})
# What a policy holds that raftmesh does not enforce (docs/api.md, policy warnings).
POLICY_WARNINGS = {"type": "array", "items": answer({"code": STR, "path": STR, "message": STR})}
CLUSTER_KEY = answer({"id": STR, "public_key": STR})
AUDIT_ENTRY = answer({"seq": VERSION, "version": VERSION, "time": TIME, "actor": STR,
                      "action": STR, "target": STR})
STREAM = answer({"node_id": STR, "replica": STR})
# A subnet route (or exit route) and the routers serving it (cluster/routes.py).
ROUTE = answer({"cidr": STR, "primary": {"type": ["string", "null"]},
                "candidates": {"type": "array", "items": answer({"id": STR, "eligible": BOOL})}},
               {"exit_node": BOOL})


def listing(name: str, record: dict) -> dict:
    """A linearizable (or ?stale=true) list of records."""
    return answer({name: {"type": "array", "items": record}, "version": VERSION, "stale": BOOL})


def reading(name: str, record: dict) -> dict:
    return answer({name: record, "version": VERSION, "stale": BOOL})


def written(name: str, record: dict, **extra: dict) -> dict:
    """The answer to a write: the record as committed and the state version it committed at."""
    return answer({name: record, "version": VERSION, **extra})


DELETED = written("deleted", ANY_OBJECT)
NODE_WRITTEN = written("node", NODE)
SECRET_SHOWN_ONCE = {"type": "string", "minLength": 1}
FRAMES = {"type": "string", "format": "binary",
          "description": "length-prefixed signed frames (docs/agents.md)"}
RELAY_SESSION = {"type": "string", "format": "binary",
                 "description": "a WebSocket of relayed WireGuard packets (docs/agents.md)"}
RELAY_LINK = {"type": "string", "format": "binary",
              "description": "a WebSocket of sealed relay frames and session announcements "
                             "between replicas (docs/deployment.md)"}

ERROR = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {
            "code": {"enum": sorted(ERROR_CODES)},
            "message": {"type": "string", "minLength": 1},
            "details": {"type": "array", "minItems": 1,
                        "items": {"type": "object", "required": ["message"],
                                  "properties": {"message": STR}}}}}}}
AUDIT_PAGE = answer({"entries": {"type": "array", "items": AUDIT_ENTRY}, "next_after_seq": VERSION,
                     "head": answer({"seq": VERSION, "hash": nullable(STR)}), "version": VERSION,
                     "stale": BOOL})
CLUSTER = answer({"members": {"type": "array",
                              "items": answer({"raft_addr": STR, "reachable": BOOL})},
                  "leader": nullable(STR), "leader_raft_addr": nullable(STR)})
LOGIN_NEEDED = answer({"login_url": STR, "login_expires_at": TIME})
# A registration: the node, or (single sign-on, no auth key) the URL to sign in at first.
REGISTERED = {"anyOf": [answer({"node": NODE, "approved": BOOL, "expired": BOOL,
                                "cluster_keys": {"type": "array", "items": CLUSTER_KEY}},
                               {"version": VERSION}), LOGIN_NEEDED]}
