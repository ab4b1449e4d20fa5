"""deploy/monitoring: the Prometheus alerting rules pass `promtool check rules` and fire when
they should (`promtool test rules`, tests/monitoring/alerts_test.yml); the Grafana dashboard is
well-formed; both refer only to metrics a replica really exports."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request

import pytest

from in_memory_api import ServedInMemory

HERE = os.path.dirname(__file__)
MONITORING = os.path.join(HERE, "..", "deploy", "monitoring")
RULES = os.path.join(MONITORING, "raftmesh-alerts.yml")
DASHBOARD = os.path.join(MONITORING, "grafana-dashboard.json")
PROMQL_WORDS = {"histogram_quantile", "sum", "by", "le", "rate", "or", "and", "job", "instance"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (deploy/install.sh --tests installs prometheus)")
    return path


def test_rules_pass_promtool_check():
    done = subprocess.run([promtool(), "check", "rules", RULES], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 6 rules found" in done.stdout


def test_rules_fire_when_they_should():
    done = subprocess.run([promtool(), "test", "rules", "alerts_test.yml"], capture_output=True,
                          text=True, timeout=60, cwd=os.path.join(HERE, "monitoring"))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> set[str]:
    """Every series name a replica's /metrics exposes (histograms with their suffixes)."""
    with ServedInMemory(str(tmp_path_factory.mktemp("metrics"))) as api:
        with urllib.request.urlopen(api.replicas[0].api_url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
    names = {"up"}  # Prometheus' own, one per scrape target
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",)}.get(kind, ("",))
        names.update(name + s for s in suffixes)
    return names


def metrics_in(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"|\[[^\]]*\]', "", expr)  # label values, ranges
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", without_strings))
    return words - PROMQL_WORDS


def rule_exprs() -> list[str]:
    return re.findall(r"^\s+expr: (.+)$", open(RULES).read(), re.M)


def test_alerts_refer_to_metrics_that_exist(exported):
    exprs = rule_exprs()
    assert len(exprs) == 6
    for expr in exprs:
        assert metrics_in(expr) and metrics_in(expr) <= exported, (expr, metrics_in(expr) - exported)


def test_dashboard_is_well_formed_and_shows_what_is_alerted_on(exported):
    with open(DASHBOARD) as f:
        dash = json.load(f)
    panels = dash["panels"]
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    assert len({p["id"] for p in panels}) == len(panels)
    shown = set()
    for p in panels:
        assert p["title"] and p["targets"] and set(p["gridPos"]) == {"h", "w", "x", "y"}
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
        for t in p["targets"]:
            used = metrics_in(t["expr"])
            assert used and used <= exported, (p["title"], t["expr"], used - exported)
            shown |= used
    alerted = set().union(*(metrics_in(e) for e in rule_exprs()))
    assert alerted <= shown | {"raftmesh_raft_leader_known"}, alerted - shown
    assert "raftmesh_map_streams" in shown and "raftmesh_connect_setup_seconds_bucket" in shown
