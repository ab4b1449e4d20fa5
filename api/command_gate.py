"""A command a release adds is proposed only once every Raft member's release applies it.

Every replica applies the same log, and a replica that meets an op its release does not know
refuses it (cluster/commands.py `Invalid`) while the others apply it: their states part for
good. During a rolling upgrade the upgraded replicas therefore hold such a command back (and
say the same thing the old way, e.g. one `node.register` entry per registration) until each
current member answers GET COMMANDS_PATH with a list that names it. That is runtime
knowledge, not replicated state (it changes when a member restarts on another release), so
it is asked again every POLL seconds, and a member that does not answer (down, unreachable,
or a release without the endpoint) counts as knowing no op until it answers again.
"""
from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge

from raftmesh.cluster.commands import COMMANDS
from .admin import member_api_urls, ok
from .responses import STR, answer
from .routing import Ctx, route

log = logging.getLogger("raftmesh.command_gate")
COMMAND_GATE = web.AppKey("command_gate", "CommandGate")
COMMANDS_PATH = "/replica/commands"
POLL = 2.0  # seconds between two rounds of asking the members
ASK_TIMEOUT = 1.0
NEEDS_EVERY_MEMBER = sorted(op for op, cls in COMMANDS.items() if cls.needs_every_member)


def all_members_apply(op: str, members: list[str], known: dict[str, frozenset[str]]) -> bool:
    """Whether every member (Raft address) last said that its release applies `op`."""
    return bool(members) and all(op in known.get(m, ()) for m in members)


class CommandGate:
    """What each current member's release applies, as it last said."""

    def __init__(self, replica, registry: CollectorRegistry):
        self.replica, self.config = replica, replica.config
        self.known: dict[str, frozenset[str]] = {self.config.raft_addr: frozenset(COMMANDS)}
        Gauge("raftmesh_commands_held_back", "Commands this release applies but does not propose "
              "because a member did not say its release applies them (a rolling upgrade, or a "
              "member that does not answer)", registry=registry).set_function(lambda: len(self.held_back()))

    def allows(self, op: str) -> bool:
        """Whether `op` may be proposed now (ops older than the gate always may)."""
        if op not in NEEDS_EVERY_MEMBER:
            return True
        return all_members_apply(op, list(self.replica.status.get("members", ())), self.known)

    def held_back(self) -> list[str]:
        return [op for op in NEEDS_EVERY_MEMBER if not self.allows(op)]

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ASK_TIMEOUT)) as http:
            while True:
                await self.ask_all(http)
                await asyncio.sleep(POLL)

    async def ask_all(self, http: aiohttp.ClientSession) -> None:
        me = self.config.raft_addr
        urls = member_api_urls(self.replica.store)
        others = [m for m in self.replica.status.get("members", ()) if m != me]
        answers = await asyncio.gather(*(self._ask(http, urls.get(m)) for m in others))
        before = self.held_back()
        self.known = {me: self.known[me], **{m: ops for m, ops in zip(others, answers)}}
        if self.held_back() != before:
            log.info("held back until every member applies them: %s", ", ".join(self.held_back()) or "none")

    @staticmethod
    async def _ask(http: aiohttp.ClientSession, url: str | None) -> frozenset[str]:
        if not url:
            return frozenset()
        try:
            async with http.get(url.rstrip("/") + COMMANDS_PATH) as resp:
                if resp.status != 200:
                    return frozenset()
                body = await resp.json()
            ops = body.get("commands") if isinstance(body, dict) else None
            return frozenset(o for o in ops if isinstance(o, str)) if isinstance(ops, list) else frozenset()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as e:
            log.debug("asking %s which commands it applies: %s", url, e)
            return frozenset()


@route("GET", COMMANDS_PATH, None, "The commands this replica's release applies (asked by the "
       "other replicas before they propose a command a release added; docs/deployment.md)",
       response=answer({"commands": {"type": "array", "items": STR}}))
async def replica_commands(ctx: Ctx):
    return ok({"commands": sorted(COMMANDS)})
