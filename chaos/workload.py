"""The chaos workload: concurrent admin-API and registration calls on every replica,
recorded as a client-side history (chaos/history.py) for the checkers.

Objects and the model each key is checked against (chaos/checkers.py):
  user:<name>        ExistenceModel  create / delete / linearizable GET
  policy             RegisterModel   PUT a policy whose first line carries a marker / GET
  pak:<id>           ExistenceModel  pre-auth keys of the owner users: create / delete / list
  node:<machine key> ExistenceModel  /machine/register (a fresh machine key each) / DELETE / GET

Clients behave like real ones: each worker is bound to one replica (`per_replica` workers
each), so a hung replica holds only its own workers and the rest show whether the
majority serves; every attempt has a bounded timeout, and a retry goes to a replica that
has not just timed out (never straight back to a hung one).

How outcomes are recorded (Jepsen's rules, README "Guarantees"):
  a definite answer (2xx, 404 on delete, 409 on create) is ok with its result;
  `503 no_leader` or a refused connection (nothing was sent) is fail;
  a timeout, a dropped connection or `503 outcome_unknown` is retried (up to 3 attempts,
  other replicas, the same Idempotency-Key, so at most one attempt can take effect); if no
  attempt gives a definite answer the op is unknown.
Ops on one object are retried as one op whose interval spans all attempts: the effect
happened exactly once, somewhere in there.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import secrets
import time
from collections import deque
from dataclasses import dataclass, field

import aiohttp
from nacl.signing import SigningKey

from raftmesh.proto.machine_auth import sign_headers
from raftmesh.proto.routes import REGISTER
from raftmesh.proto.version import version_header

from .history import FAIL, OK, UNKNOWN, Operation

OWNERS = ("chaos-own0", "chaos-own1")  # own pre-auth keys and nodes; never deleted
USER_POOL = 12
MAX_LIVE = 24  # cap on live keys / nodes per kind, so reads stay cheap
CLIENT_TIMEOUT = 3.0  # per attempt, like a client behind a load balancer; a healthy majority answers far sooner
OP_BUDGET = 12.0  # no new attempt after this long
SETUP_SECONDS = 60.0
BACKOFF = 0.2  # seconds at most before the next request after a refusal
SUSPECT_SECONDS = 5.0  # a replica that just timed out gets no retries for this long
MIX = (("user", 40), ("policy", 15), ("key", 20), ("node", 25))
POLICY = '// chaos-marker {marker}\n{{"acls": [{{"action": "accept", "src": ["*"], "dst": ["*:*"]}}]}}\n'


@dataclass
class Anomaly:
    """An answer no correct replica gives to this workload (a 500, an unexpected 4xx)."""

    time: float
    what: str
    status: int | None
    body: str


@dataclass
class Stats:
    started: int = 0
    done: dict = field(default_factory=lambda: {OK: 0, FAIL: 0, UNKNOWN: 0})
    attempts: int = 0
    retries: int = 0


class Workload:
    def __init__(self, urls: list[str], admin_key: str, seed: int, t0: float, per_replica: int = 3):
        self.urls, self.admin_key, self.seed, self.t0 = urls, admin_key, seed, t0
        self.per_replica = per_replica
        self.run_id = secrets.token_hex(4)
        self.history: list[Operation] = []
        self.anomalies: list[Anomaly] = []
        self.stats = Stats()
        self.setup_keys: dict[str, str] = {}  # owner -> pre-auth key token (registrations)
        self.setup_key_ids: set[str] = set()
        self.live_keys: dict[str, str] = {}  # id -> owner
        self.key_owner: dict[str, str] = {}  # every id created by the workload -> owner
        self.live_nodes: dict[str, str] = {}  # machine key -> node id
        self.attempts: list[dict] = []  # every HTTP attempt: the evidence behind each op
        self.acks: list[tuple[float, int]] = []  # (time, replica index) of every acknowledged write
        self._suspect: dict[int, float] = {}  # replica index -> when an attempt there last timed out
        self.recent: deque = deque()  # (time, kind, ident) of finished deletes: still read a while
        self._ids = iter(range(1, 1 << 62))
        self.session: aiohttp.ClientSession | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    # -- HTTP ------------------------------------------------------------------------------------
    async def _http(self, op_id, url: str, method: str, path: str, body=None, headers=None, data=None):
        """('done', status, parsed) if answered; ('refused', ...) if nothing was sent;
        ('lost', ...) if the request may have reached the replica."""
        hdrs = {"Authorization": f"Bearer {self.admin_key}", **(headers or {})}
        self.stats.attempts += 1
        record = {"op": op_id, "replica": url, "method": method, "path": path, "sent": self.now()}
        self.attempts.append(record)
        outcome = self._attempt(url, method, path, body, hdrs, data)
        result = await outcome
        record.update(answered=self.now(), outcome=result[0], status=result[1],
                      answer=result[2] if result[0] != "done" or result[1] >= 300 else None)
        return result

    async def _attempt(self, url, method, path, body, hdrs, data):
        try:
            async with self.session.request(method, url + path, json=body, data=data, headers=hdrs,
                                            timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)) as resp:
                raw = await resp.read()
                try:
                    return "done", resp.status, json.loads(raw)
                except ValueError:
                    return "done", resp.status, raw.decode(errors="replace")
        except aiohttp.ClientConnectorError as e:
            return "refused", None, str(e)
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError) as e:
            return "lost", None, repr(e)

    def _anomaly(self, what: str, status, body) -> None:
        self.anomalies.append(Anomaly(self.now(), what, status, json.dumps(body)[:300]))

    async def _write(self, rng, what, method, path, body=None, data=None, headers=None, sign=None,
                     interpret=None, home: int | None = None):
        """Run one logical write with retries; returns (status, result, invoke, complete, answer).
        The first attempt goes to `home` (the worker's replica), retries elsewhere."""
        op_id = next(self._ids)
        idem = {"Idempotency-Key": f"chaos-{self.run_id}-{op_id}"}
        invoke, lost = self.now(), False
        target = rng.randrange(len(self.urls)) if home is None else home
        tried: list[int] = []
        for attempt in range(3):
            if attempt:
                self.stats.retries += 1
                await asyncio.sleep(rng.uniform(0.2, 0.5))
                if self.now() - invoke > OP_BUDGET:
                    break
                target = self._retry_target(rng, tried)
            tried.append(target)
            url = self.urls[target]
            extra = sign() if sign else {}
            outcome, status, answer = await self._http(op_id, url, method, path, body,
                                                       {**idem, **(headers or {}), **extra}, data)
            if outcome == "refused":
                if not lost:
                    return await self._backoff(rng, (FAIL, None, invoke, self.now(), answer, op_id))
                continue
            if outcome == "lost":
                lost = True
                self._suspect[target] = self.now()
                continue
            code = answer.get("error", {}).get("code") if isinstance(answer, dict) else None
            if status == 503 and code in ("no_leader", "not_ready"):  # refused before any effect
                if not lost:
                    return await self._backoff(rng, (FAIL, None, invoke, self.now(), answer, op_id))
                continue
            if status == 503 and code == "outcome_unknown":
                lost = True
                continue
            result = interpret(status, code, answer, lost)
            if result is _UNEXPECTED:
                self._anomaly(f"{method} {path}", status, answer)
                return (UNKNOWN if lost else FAIL), None, invoke, self.now(), answer, op_id
            self.acks.append((self.now(), target))
            return OK, result, invoke, self.now(), answer, op_id
        return UNKNOWN, None, invoke, None, None, op_id

    @staticmethod
    async def _backoff(rng, outcome: tuple) -> tuple:
        """A client told "not now" waits a moment before its next request, as real ones do;
        without it a worker on a dead replica spun out thousands of refusals a second,
        which swamped the history and the op counts."""
        await asyncio.sleep(rng.uniform(BACKOFF / 2, BACKOFF))
        return outcome

    def _retry_target(self, rng, tried: list[int]) -> int:
        """A replica not tried for this op and not timed out lately, if there is one: retrying
        on a hung replica only repeats the wait."""
        now = self.now()
        fresh = [i for i in range(len(self.urls)) if i not in tried]
        healthy = [i for i in fresh if now - self._suspect.get(i, -SUSPECT_SECONDS) >= SUSPECT_SECONDS]
        return rng.choice(healthy or fresh or range(len(self.urls)))

    async def _read(self, rng, home: int, what, path, interpret):
        invoke, op_id = self.now(), next(self._ids)
        url = self.urls[home]
        outcome, status, answer = await self._http(op_id, url, "GET", path)
        complete = self.now()
        if outcome == "refused":
            return await self._backoff(rng, (FAIL, None, invoke, complete, answer, op_id))
        if outcome != "done":
            return UNKNOWN, None, invoke, complete, answer, op_id
        code = answer.get("error", {}).get("code") if isinstance(answer, dict) else None
        if status == 503 and code == "not_ready":
            return await self._backoff(rng, (FAIL, None, invoke, complete, answer, op_id))
        result = interpret(status, code, answer)
        if result is _UNEXPECTED:
            self._anomaly(f"GET {path}", status, answer)
            return FAIL, None, invoke, complete, answer, op_id
        return OK, result, invoke, complete, answer, op_id

    def _record(self, process, key, f, value, outcome, part: str = "") -> Operation:
        """Append the op; its id is the one its HTTP attempts are logged under."""
        status, result, invoke, complete, _, op_id = outcome
        if status == UNKNOWN:
            complete = None
        op = Operation(process=process, op_id=f"{op_id}{part}", key=key, f=f, value=value,
                       invoke=invoke, complete=complete, status=status, result=result)
        self.history.append(op)
        self.stats.done[status] += 1
        return op

    # -- set-up ------------------------------------------------------------------------------------
    async def setup(self) -> None:
        """Owner users and one reusable pre-auth key each, before any fault (must succeed;
        a loaded machine or a cluster still settling its first election may need a while)."""
        rng = random.Random(self.seed)
        for owner in OWNERS:
            await self._until_ok(f"create user {owner}", lambda: self._write(
                rng, "setup", "POST", "/api/v1/users", {"name": owner},
                interpret=lambda s, c, a, lost: s if s in (201, 409) else _UNEXPECTED))
            answer = await self._until_ok(f"create a pre-auth key for {owner}", lambda: self._write(
                rng, "setup", "POST", "/api/v1/preauth-keys",
                {"user": owner, "reusable": True, "expiration_seconds": 86400},
                interpret=lambda s, c, a, lost: a if s == 201 else _UNEXPECTED))
            self.setup_keys[owner] = answer["key"]
            self.setup_key_ids.add(answer["preauth_key"]["id"])

    async def _until_ok(self, what: str, write) -> object:
        deadline = time.monotonic() + SETUP_SECONDS
        while time.monotonic() < deadline:
            status, result, *_ = await write()
            if status == OK:
                return result
            if status == UNKNOWN:  # a new attempt could add a second, unexplained object
                break
            await asyncio.sleep(0.5)
        raise RuntimeError(f"set-up: could not {what} within {SETUP_SECONDS:g}s")

    # -- the run -----------------------------------------------------------------------------------
    async def run(self, seconds: float) -> None:
        connector = aiohttp.TCPConnector(limit=0, force_close=True)  # a refused connect = not sent
        async with aiohttp.ClientSession(connector=connector) as self.session:
            # aiohttp silently resends PUT/DELETE/GET once after a dropped connection; a
            # resend that is then refused would turn an applied write into a "fail" here.
            # Every attempt must be ours to see (aiohttp's own test client does the same).
            self.session._retry_connection = False
            await self.setup()
            deadline = time.monotonic() + seconds
            workers = len(self.urls) * self.per_replica
            await asyncio.gather(*(self._worker(w, w % len(self.urls), deadline) for w in range(workers)))

    async def _worker(self, w: int, home: int, deadline: float) -> None:
        rng = random.Random(f"{self.seed}:worker:{w}")
        kinds, weights = zip(*MIX)
        while time.monotonic() < deadline:
            self.stats.started += 1
            kind = rng.choices(kinds, weights)[0]
            await getattr(self, f"_op_{kind}")(w, rng, home)

    async def _op_user(self, w, rng, home) -> None:
        name = f"u{rng.randrange(USER_POOL)}"
        key, path = f"user:{name}", f"/api/v1/users/{name}"
        f = rng.choices(("create", "delete", "read"), (35, 30, 35))[0]
        if f == "create":
            out = await self._write(rng, key, "POST", "/api/v1/users", {"name": name}, home=home, interpret=lambda s, c, a, lost:
                                    "created" if s == 201 else "exists" if (s, c) == (409, "conflict") else _UNEXPECTED)
        elif f == "delete":
            out = await self._write(rng, key, "DELETE", path, home=home, interpret=lambda s, c, a, lost:
                                    "deleted" if s == 200 else "absent" if (s, c) == (404, "not_found") else _UNEXPECTED)
        else:
            out = await self._read(rng, home, key, path, lambda s, c, a:
                                   True if s == 200 else False if (s, c) == (404, "not_found") else _UNEXPECTED)
        self._record(w, key, f, None, out)

    async def _op_policy(self, w, rng, home) -> None:
        if rng.random() < 0.5:
            marker = f"m{w}-{next(self._ids)}"
            out = await self._write(rng, "policy", "PUT", "/api/v1/policy", data=POLICY.format(marker=marker),
                                    headers={"Content-Type": "text/plain"},
                                    home=home, interpret=lambda s, c, a, lost: None if s == 200 else _UNEXPECTED)
            self._record(w, "policy", "write", marker, out)
        else:
            out = await self._read(rng, home, "policy", "/api/v1/policy", lambda s, c, a:
                                   policy_marker(a["policy"]["text"]) if s == 200
                                   else None if (s, c) == (404, "not_found") else _UNEXPECTED)
            self._record(w, "policy", "read", None, out)

    async def _op_key(self, w, rng, home) -> None:
        owner = rng.choice(OWNERS)
        choice = rng.choices(("create", "delete", "read"), (40, 30, 30))[0]
        if choice == "create" and len(self.live_keys) >= MAX_LIVE or choice == "delete" and not self.live_keys:
            choice = "read"
        if choice == "create":
            out = await self._write(rng, "pak", "POST", "/api/v1/preauth-keys",
                                    {"user": owner, "reusable": True, "expiration_seconds": 86400},
                                    home=home, interpret=lambda s, c, a, lost: a["preauth_key"]["id"] if s == 201 else _UNEXPECTED)
            if out[0] == OK:
                kid = out[1]
                self.live_keys[kid] = self.key_owner[kid] = owner
                self._record(w, f"pak:{kid}", "create", owner, (OK, "created", *out[2:]))
            else:  # an unknown one's id, if it exists, is learnt from the final state
                self._record(w, f"pak?:{owner}", "create", owner, out)
        elif choice == "delete":
            kid = rng.choice(sorted(self.live_keys))
            out = await self._write(rng, f"pak:{kid}", "DELETE", f"/api/v1/preauth-keys/{kid}", home=home, interpret=lambda s, c, a, lost:
                                    "deleted" if s == 200 else "absent" if (s, c) == (404, "not_found") else _UNEXPECTED)
            self._record(w, f"pak:{kid}", "delete", None, out)
            if out[0] == OK:
                self.live_keys.pop(kid, None)
                self.recent.append((self.now(), "pak", kid))
        else:
            watched = self._watched("pak", self.live_keys)
            out = await self._read(rng, home, "pak", f"/api/v1/preauth-keys?user={owner}", lambda s, c, a:
                                   [k["id"] for k in a["preauth_keys"]] if s == 200 else _UNEXPECTED)
            status, ids = out[0], set(out[1] or ())
            for kid in sorted(k for k in watched if k[1] == owner):
                self._record(w, f"pak:{kid[0]}", "read", None, (status, kid[0] in ids, *out[2:]), f".{kid[0]}")

    def _watched(self, kind: str, live: dict) -> set:
        """Live objects plus those deleted in the last 10 s: (ident, owner) pairs."""
        while self.recent and self.recent[0][0] < self.now() - 10:
            self.recent.popleft()
        idents = set(live) | {i for t, k, i in self.recent if k == kind}
        return {(i, self.key_owner.get(i)) for i in idents} if kind == "pak" else idents

    async def _op_node(self, w, rng, home) -> None:
        choice = rng.choices(("register", "delete", "read"), (40, 30, 30))[0]
        if choice == "register" and len(self.live_nodes) >= MAX_LIVE or choice != "register" and not self.live_nodes:
            choice = "register" if not self.live_nodes else "read"
        if choice == "register":
            await self._register(w, rng, home)
            return
        machine = rng.choice(sorted(self.live_nodes))
        node_id, key = self.live_nodes[machine], f"node:{machine}"
        if choice == "delete":
            out = await self._write(rng, key, "DELETE", f"/api/v1/nodes/{node_id}", home=home, interpret=lambda s, c, a, lost:
                                    "deleted" if s == 200 else "absent" if (s, c) == (404, "not_found") else _UNEXPECTED)
            self._record(w, key, "delete", None, out)
            if out[0] == OK:
                self.live_nodes.pop(machine, None)
        else:
            out = await self._read(rng, home, key, f"/api/v1/nodes/{node_id}", lambda s, c, a:
                                   True if s == 200 else False if (s, c) == (404, "not_found") else _UNEXPECTED)
            self._record(w, key, "read", None, out)

    async def _register(self, w, rng, home) -> None:
        signer = SigningKey.generate()
        machine = base64.b64encode(bytes(signer.verify_key)).decode()
        owner = rng.choice(OWNERS)
        body = json.dumps({"node_key": base64.b64encode(os.urandom(32)).decode(),
                           "hostname": f"chaos-{w}-{next(self._ids)}",
                           "auth_key": self.setup_keys[owner]}).encode()

        def sign():
            return {**sign_headers(signer, "POST", REGISTER, body, time.time(), secrets.token_hex(12)),
                    **version_header(), "Content-Type": "application/json"}

        node = {}

        def interpret(s, c, a, lost):
            if s != 200 or a.get("node", {}).get("machine_key") != machine:
                return _UNEXPECTED
            node["id"] = a["node"]["id"]
            # Only this op ever uses this machine key: an existing node is its own earlier attempt.
            return "created" if "version" in a or lost else "exists"

        out = await self._write(rng, f"node:{machine}", "POST", REGISTER, data=body, sign=sign,
                                home=home, interpret=interpret)
        self._record(w, f"node:{machine}", "create", None, out)
        if out[0] == OK:
            self.live_nodes[machine] = node["id"]


class _Unexpected:
    def __repr__(self):
        return "UNEXPECTED"


_UNEXPECTED = _Unexpected()


def policy_marker(text: str) -> str | None:
    first = text.split("\n", 1)[0]
    return first.split("chaos-marker ", 1)[1].strip() if "chaos-marker " in first else None
