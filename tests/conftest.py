"""Shared fixtures: real replica processes on loopback, always ended by pid."""
from __future__ import annotations

import pytest

from raftmesh.cli.main import build_parser
from raftmesh.lab.local_cluster import LocalCluster
from waiting import wait_until  # noqa: F401  (re-exported for test modules)


@pytest.fixture
def make_cluster(tmp_path):
    """Factory: make_cluster(n, extra_args=[...]) -> started, ready LocalCluster."""
    clusters: list[LocalCluster] = []

    def make(replicas: int = 3, extra_args: list[str] | None = None, start: bool = True) -> LocalCluster:
        c = LocalCluster(str(tmp_path / f"cluster{len(clusters)}"), replicas=replicas,
                         extra_args=extra_args)
        clusters.append(c)
        if start:
            c.start_all()
            c.wait_ready(timeout=30)
        return c

    yield make
    for c in clusters:
        c.stop_all()


def _running_cluster(tmp_path_factory, name: str, replicas: int):
    c = LocalCluster(str(tmp_path_factory.mktemp(name)), replicas=replicas)
    c.start_all()
    try:
        c.wait_ready(timeout=30)
        yield c
    finally:
        c.stop_all()


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory):
    """One 3-replica cluster for a whole test module (tests must not depend on order)."""
    yield from _running_cluster(tmp_path_factory, "shared", 3)


@pytest.fixture(scope="module")
def single_replica(tmp_path_factory):
    """A 1-replica cluster for a whole test module: writes commit at once, one log to read."""
    yield from _running_cluster(tmp_path_factory, "single", 1)


def bench_args(name: str, argv: list[str]):
    """`raftmesh bench <name> <argv>` as the CLI parses it (with the options it adds to every
    benchmark, such as --replicas)."""
    return build_parser().parse_args(["bench", name, *argv])
