"""Every replica's live health figures in one answer, for the console's Live health page:
each replica's own /metrics (latency histograms, open agent streams), fetched over its API
address with a short timeout, so a down replica shows as down instead of failing the page."""
from __future__ import annotations

import asyncio

import aiohttp
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from .admin import V, ok, raft_members
from .health import REGISTRY
from .responses import BOOL, STR, answer, nullable
from .routing import Ctx, route

HISTOGRAMS = ("raftmesh_netmap_propagation_seconds", "raftmesh_revoke_seconds",
              "raftmesh_connect_setup_seconds")
STREAMS = "raftmesh_map_streams"
PEER_TIMEOUT = 1.0  # seconds: a slow replica is shown down rather than holding up the page

REPLICA_HEALTH = answer({"id": nullable(STR), "raft_addr": STR, "up": BOOL},
                        {"error": STR, "streams": {"type": "number"},
                         "histograms": {"type": "object", "additionalProperties": {
                             "type": "array", "items": {"type": "array"}}}})


def figures(metrics_text: str) -> dict:
    """From Prometheus text: per histogram its cumulative buckets [[le, count]] (le a string,
    "+Inf" last; series with other labels summed), and the open agent streams."""
    buckets: dict[str, dict[str, float]] = {name: {} for name in HISTOGRAMS}
    streams = 0.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name in buckets:
            for sample in family.samples:
                if sample.name == family.name + "_bucket":
                    le = sample.labels["le"]
                    buckets[family.name][le] = buckets[family.name].get(le, 0.0) + sample.value
        elif family.name == STREAMS:
            streams = sum(s.value for s in family.samples)
    ordered = {name: sorted(b.items(), key=lambda kv: float(kv[0])) for name, b in buckets.items()}
    return {"histograms": {name: [[le, n] for le, n in b] for name, b in ordered.items()},
            "streams": streams}


@route("GET", V + "/cluster/health", "read", "Each replica's live health figures: latency "
       "histograms and open agent streams (a replica that does not answer within 1 s is down)",
       response=answer({"replicas": {"type": "array", "items": REPLICA_HEALTH}}))
async def cluster_health(ctx: Ctx):
    async def of(session: aiohttp.ClientSession, member: dict) -> dict:
        head = {"id": member["id"], "raft_addr": member["raft_addr"]}
        if member["raft_addr"] == ctx.config.raft_addr:
            return {**head, "up": True, **figures(generate_latest(ctx.request.app[REGISTRY]).decode())}
        if not member.get("api_url"):
            return {**head, "up": False, "error": "no API address registered"}
        try:
            async with session.get(member["api_url"] + "/metrics") as resp:
                resp.raise_for_status()
                text = await resp.text()
            return {**head, "up": True, **figures(text)}
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            return {**head, "up": False, "error": f"unreachable ({type(e).__name__})"}

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PEER_TIMEOUT)) as session:
        replicas = await asyncio.gather(*(of(session, m) for m in raft_members(ctx)))
    return ok({"replicas": replicas})
