"""`raftmesh chaos soak`: its judgement on hand-made samples, and a short real soak."""
from __future__ import annotations

import argparse
import json

import pytest

from raftmesh.chaos import soak


def sample(t, rss, fds, connected=10, reconnects=0):
    return {"t": t, "rss_kib": {"r1": rss + 30_000}, "anon_kib": {"r1": rss}, "fds": {"r1": fds}, "connected": connected,
            "reconnects": reconnects}


def checks(samples, agents=10, warmup=10):
    return {c["name"]: c["ok"] for c in soak.judge(samples, agents, warmup)}


def test_flat_memory_and_descriptors_pass_and_growth_after_the_warm_up_fails():
    warm = [sample(t, 50_000 + t * 1000, 40 + t) for t in range(0, 10)]  # growth while warming up is fine
    flat = [sample(10 + t, 100_000 + (t % 2) * 2000, 50) for t in range(10)]
    assert checks(warm + flat) == {"r1 memory flat": True, "r1 descriptors flat": True, "no stream lost": True}
    leaking = [sample(10 + t, 100_000 + t * 1000, 50 + t) for t in range(10)]
    assert checks(warm + leaking) == {"r1 memory flat": False, "r1 descriptors flat": False,
                                      "no stream lost": True}


def test_a_lost_stream_or_a_reconnect_fails_and_too_few_samples_say_so():
    flat = [sample(10 + t, 100_000, 50) for t in range(10)]
    assert not checks(flat[:-1] + [sample(20, 100_000, 50, connected=9)])["no stream lost"]
    assert not checks(flat[:-1] + [sample(20, 100_000, 50, reconnects=1)])["no stream lost"]
    assert checks(flat[:3]) == {"enough samples": False}


def test_bad_arguments_are_refused(capsys):
    parser = argparse.ArgumentParser()
    soak.add_arguments(parser)
    assert soak.main(parser.parse_args(["--minutes", "0"])) == 2
    assert "--minutes > 0" in capsys.readouterr().err


@pytest.mark.timeout(180)
def test_a_short_soak_keeps_every_stream_and_writes_its_plot(tmp_path):
    result = soak.run(str(tmp_path), minutes=0.25, agents=30, writes_per_second=10, sample_every=1.5)
    by_name = {c["name"]: c for c in result["checks"]}
    assert by_name["no stream lost"]["ok"], by_name["no stream lost"]
    assert all(by_name[f"r{i} descriptors flat"]["ok"] for i in (1, 2, 3)), result["checks"]
    assert result["writes"] > 50 and all(s["connected"] == 30 for s in result["samples"])
    assert json.loads((tmp_path / "soak.json").read_text())["agents"] == 30
    assert (tmp_path / "soak.png").stat().st_size > 0
