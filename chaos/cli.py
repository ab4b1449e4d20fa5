"""`raftmesh chaos ...`: seeded fault schedules against real replicas, with checkers."""
from __future__ import annotations

import argparse
import importlib

from raftmesh.lab.processes import cleaned_up_on_sigterm


def register(sub) -> None:
    run = importlib.import_module("raftmesh.chaos.run")
    chaos = sub.add_parser("chaos", help="fault injection with checkers (docs/chaos.md)")
    cmds = chaos.add_subparsers(dest="chaos", required=True)
    p = cmds.add_parser("run", help="run a seeded fault schedule against real replicas and check it",
                        description=run.__doc__, formatter_class=_raw_help())
    run.add_arguments(p)
    p.set_defaults(func=cleaned_up_on_sigterm(run.main))
    campaign = importlib.import_module("raftmesh.chaos.campaign")
    p = cmds.add_parser("campaign", help="many seeded schedules back to back, one verdict table",
                        description=campaign.__doc__, formatter_class=_raw_help())
    campaign.add_arguments(p)
    p.set_defaults(func=cleaned_up_on_sigterm(campaign.main))
    soak = importlib.import_module("raftmesh.chaos.soak")
    p = cmds.add_parser("soak", help="long moderate write load with agents streaming: memory, fds, latency",
                        description=soak.__doc__, formatter_class=_raw_help())
    soak.add_arguments(p)
    p.set_defaults(func=cleaned_up_on_sigterm(soak.main))


def _raw_help():
    return argparse.RawDescriptionHelpFormatter
