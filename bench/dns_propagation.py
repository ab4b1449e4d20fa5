"""`raftmesh bench dns-propagation`: a change of the cluster's DNS settings, from the API's
acknowledgement until every agent applied it (issue #23: p99 <= 1 s at 1,000 agents).

The measurement is bench/propagation.py's, with each change flipping the mesh domain
(PUT /api/v1/dns) instead of the policy's port: every agent's netmap carries the DNS
settings, so every agent gets one small delta."""
from __future__ import annotations

from . import propagation


def add_arguments(parser) -> None:
    propagation.add_arguments(parser)


def main(args) -> int:
    return propagation.main(args, change="dns")
