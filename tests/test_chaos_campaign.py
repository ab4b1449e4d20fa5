"""`raftmesh chaos campaign`: the verdict table on hand-made rows, and a short real campaign
(two seeds, 3 and 5 replicas) as CI runs it."""
from __future__ import annotations

import argparse
import json

import pytest

from raftmesh.chaos import campaign
from raftmesh.lab import replica_net as netlab

needs_netns = pytest.mark.skipif(bool(netlab.preflight()), reason="needs root, iproute2 and nftables")


def row(seed, verdict="PASS", failed=(), **extra):
    return {"seed": seed, "replicas": 3, "rc": 0, "verdict": verdict, "failed": list(failed), "ops": 100,
            "faults": 4, "worst_gap": 0.5, "load": {"start": 1.0, "end": 2.0}, "out": "x", **extra}


def test_an_availability_failure_counts_only_if_its_rerun_fails_too():
    flaky = row(2, "FAIL", ["available"], rerun=row(2))
    stalled = row(3, "FAIL", ["available"], rerun=row(3, "FAIL", ["available"]))
    unsafe = row(4, "FAIL", ["linearizable", "settled"])
    stuck = row(5, "FAIL", ["settled", "faults"])
    broken = row(6, "FAIL", ["faults"])
    text = campaign.render([row(1), flaky, stalled, unsafe, stuck, broken])
    assert text.startswith("raftmesh chaos campaign: 2/6 runs passed; failed: 1 on a safety check, 2 on "
                           "liveness only, 1 in the harness; 600 ops")
    assert "| 2 | 2 | 3 | FAIL (available), re-run PASS |" in text
    assert "| 3 | 3 | 3 | FAIL (available), re-run FAIL |" in text
    assert "| 4 | 4 | 3 | FAIL (linearizable, settled) |" in text


def test_a_run_that_could_not_start_is_an_error_row(tmp_path):
    r = campaign.summarize(2, 9, 5, str(tmp_path / "missing"))
    assert r["verdict"] == "ERROR" and r["failed"] == ["run"] and r["replicas"] == 5


def test_bad_arguments_are_refused_before_anything_runs(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    campaign.add_arguments(parser)
    assert campaign.main(parser.parse_args(["--runs", "0", "--out", str(tmp_path)])) == 2
    assert campaign.main(parser.parse_args(["--replicas", "4", "--out", str(tmp_path)])) == 2
    assert "--replicas a list of 3 and 5" in capsys.readouterr().err
    # too short for every fault kind: said once, not by 100 runs that each fail to start
    out = tmp_path / "short"
    assert campaign.main(parser.parse_args(["--runs", "100", "--duration", "30", "--out", str(out)])) == 2
    assert "--duration 30s is too short" in capsys.readouterr().err and not out.exists()


@needs_netns
@pytest.mark.timeout(240)
def test_a_short_campaign_passes_with_a_table_json_and_png(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    campaign.add_arguments(parser)
    out = tmp_path / "campaign"
    args = parser.parse_args(["--runs", "2", "--seed", "11", "--duration", "15", "--faults", "kill,pause",
                              "--out", str(out)])
    rc = campaign.main(args)
    text = (out / "campaign.txt").read_text()
    assert rc == 0, text
    rows = json.loads((out / "campaign.json").read_text())
    assert [(r["seed"], r["replicas"], r["verdict"]) for r in rows] == [(11, 3, "PASS"), (12, 5, "PASS")]
    assert all(r["ops"] > 100 and r["faults"] >= 2 and r["worst_gap"] <= 2.0 for r in rows)
    assert (out / "campaign.png").stat().st_size > 0
    assert "[campaign 2/2] seed 12, 5 replicas: PASS" in capsys.readouterr().out
