"""`raftmesh bench lockdown`: a user locked (or deactivated by SCIM) until its device is gone
from every peer's `wg show` (the identity issue's lock-down measurement).

Target: p99 <= 500 ms with real WireGuard, from the lock request's answer.

It is `raftmesh bench revoke`'s real part (bench/revoke.py: K `raftmesh agent up` daemons
with wireguard-go in network namespaces, one victim daemon per round that all of them have
as a peer, one `wg show` poller per daemon) with another revocation per round:

- `lock`: `POST /api/v1/users/svc/lock` (then unlock and a new pre-auth key for the next
  round's victim: the lock revoked the old ones);
- `scim`: the svc user provisioned by SCIM, `PATCH /scim/v2/Users/<id>` with `active: false`
  (then reactivated, and a new pre-auth key).
"""
from __future__ import annotations

import argparse

from raftmesh.bench import harness, report
from raftmesh.bench.revoke import DeleteNode, run_real, timed_request
from raftmesh.lab.local_cluster import LocalCluster

TARGET_S = 0.5
USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
PATCH_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


def _fresh_key(cluster: LocalCluster, user: str) -> str:
    status, body = cluster.request(cluster.replicas[0], "POST", "/api/v1/preauth-keys", {"user": user})
    if status != 201:
        raise RuntimeError(f"pre-auth key for {user}: {status} {body}")
    return body["key"]


class LockUser(DeleteNode):
    name = "POST /users/{name}/lock"

    def victim_key(self, cluster: LocalCluster, r: int) -> str:
        if r:  # the previous round locked the user
            timed_request(cluster, "POST", f"/api/v1/users/{harness.SVC_USER}/unlock")
        return _fresh_key(cluster, harness.SVC_USER)

    def revoke(self, cluster: LocalCluster, node_id: str) -> dict:
        return timed_request(cluster, "POST", f"/api/v1/users/{harness.SVC_USER}/lock",
                             {"reason": "bench lockdown"})


class ScimDeactivate(DeleteNode):
    name = "SCIM PATCH active=false"

    def setup(self, cluster: LocalCluster, keys: dict[str, str]) -> None:
        super().setup(cluster, keys)
        status, body = cluster.request(cluster.replicas[0], "POST", "/scim/v2/Users",
                                       {"schemas": [USER_SCHEMA], "userName": harness.SVC_USER},
                                       headers={"Content-Type": "application/scim+json"})
        if status != 201:
            raise RuntimeError(f"SCIM user {harness.SVC_USER}: {status} {body}")
        self.scim_id = body["id"]

    def _active(self, cluster: LocalCluster, active: bool) -> dict:
        return timed_request(cluster, "PATCH", f"/scim/v2/Users/{self.scim_id}", {
            "schemas": [PATCH_SCHEMA], "Operations": [{"op": "replace", "value": {"active": active}}]},
            ok=204)

    def victim_key(self, cluster: LocalCluster, r: int) -> str:
        if r:
            self._active(cluster, True)
        return _fresh_key(cluster, harness.SVC_USER)

    def revoke(self, cluster: LocalCluster, node_id: str) -> dict:
        return self._active(cluster, False)


VIAS = {"lock": LockUser, "scim": ScimDeactivate}


def run(out_dir: str, real: int = 3, rounds: int = 5, vias: tuple[str, ...] = ("lock", "scim"),
        keepalive: float = 10.0, timeout: float = 60.0, replicas: int = 3) -> dict:
    with harness.BenchRun("lockdown") as bench_run:
        result = {"benchmark": "lockdown", "machine": bench_run.machine(), "pids": bench_run.pids,
                  "config": {"replicas": replicas, "stream_keepalive_s": keepalive, "real": real,
                             "rounds": rounds, "via": list(vias)}}
        for via in vias:
            result[via] = run_real(bench_run, real, rounds, keepalive, timeout, replicas, VIAS[via](),
                                   part=via)
    rows, targets, series = [], [], {}
    for via in vias:
        part = result[via]
        if "skipped" in part:
            print(f"{via} skipped: {part['skipped']}")
            continue
        s = part["removed"]
        rows.append({"via": VIAS[via].name, "daemons": part["daemons"], "samples": s["n"],
                     "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "max_ms": s["max_ms"],
                     "missing": part["missing"], "poll_ms": part["poll_ms"],
                     "server_p99_le_ms": part["server_histogram"]["p99_le_ms"]})
        targets.append({"via": via, "target_p99_s": TARGET_S, "p99_s": s["p99_ms"] / 1e3,
                        "met": part["missing"] == 0 and s["p99_ms"] <= TARGET_S * 1e3})
        series[VIAS[via].name] = part["samples_removed_s"]
    result["targets"], result["table"] = targets, rows
    report.print_table("lockdown: lock/deactivate -> the user's device gone from every peer's wg show "
                       "(ms from the API's answer)", rows,
                       ["via", "daemons", "samples", "p50_ms", "p99_ms", "max_ms", "missing",
                        "poll_ms", "server_p99_le_ms"])
    report.print_p99_targets(targets, lambda t: f" ({t['via']})")
    report.save(out_dir, "lockdown", result, lambda: report.plot_cdfs(
        out_dir, "lockdown", "lockdown: API answer -> device gone from peer (CDF)", series))
    return result


# -- CLI: `raftmesh bench lockdown` (bench/cli.py) -------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--real", type=int, default=3, help="peer daemons with wireguard-go (needs root)")
    parser.add_argument("--rounds", type=int, default=5, help="lock-downs per way")
    parser.add_argument("--via", default="lock,scim", type=_vias,
                        help="comma-separated: lock (the lock API), scim (SCIM deactivation)")
    harness.add_agent_options(parser, workers=False, register_concurrency=False)
    parser.add_argument("--timeout", type=float, default=60.0, help="per round")


def _vias(text: str) -> tuple[str, ...]:
    vias = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in vias if v not in VIAS]
    if unknown or not vias:
        raise argparse.ArgumentTypeError(f"takes {', '.join(VIAS)}, comma-separated; not {text!r}")
    return vias


def main(args) -> int:
    """0 when every peer dropped every locked device (whether or not within the target), else 1."""
    r = run(args.out, args.real, args.rounds, args.via, args.stream_keepalive, args.timeout,
            args.replicas)
    return 1 if any(r[v].get("missing") for v in args.via) else 0
