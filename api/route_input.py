"""Routes as clients send them (admin approvals, agents' advertisements), checked once at
the edge so a typo is a 400 naming it, never a stored route no netmap can use."""
from __future__ import annotations

from raftmesh.cluster.routes import RouteError, canonical_routes

from .errors import APIError


def checked_routes(cidrs: list) -> list[str]:
    """Canonical CIDRs, or a 400 naming the one that is not a CIDR."""
    try:
        return canonical_routes(cidrs)
    except RouteError as e:
        raise APIError(400, "invalid_route", str(e)) from None
