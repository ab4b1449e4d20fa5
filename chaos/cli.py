"""`raftmesh chaos ...`: seeded fault schedules against real replicas, with checkers."""
from __future__ import annotations

import argparse

from raftmesh.lab.lazy_commands import LazyParser


def register(sub) -> None:
    chaos = sub.add_parser("chaos", help="fault injection with checkers (docs/chaos.md)")
    cmds = chaos.add_subparsers(dest="chaos", required=True, parser_class=LazyParser)
    for name, summary in COMMANDS:
        cmds.add_parser(name, help=summary, formatter_class=argparse.RawDescriptionHelpFormatter
                        ).module = f"raftmesh.chaos.{name}"


COMMANDS = [
    ("run", "run a seeded fault schedule against real replicas and check it"),
    ("campaign", "many seeded schedules back to back, one verdict table"),
    ("soak", "long moderate write load with agents streaming: memory, fds, latency"),
]
