"""R21: the Grafana dashboard shipped in docs/grafana/hadash.json asks only for
metrics that /metrics exposes, in PromQL that Prometheus parses."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from django.apps import apps
from django.utils import timezone

from .test_metrics import CI, PROMTOOL, _fleet_with_history, samples, scrape

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "hadash.json"
METRIC = re.compile(r"\bhadash_[a-zA-Z0-9_]+")
# Grafana's variables, as Grafana would substitute them.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h",
                "$cluster": ".*"}


def exprs(dashboard: dict) -> list[str]:
    found = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    for var in dashboard["templating"]["list"]:
        if var.get("type") == "query":
            found.append(var["definition"])
    return found


@pytest.mark.django_db
def test_r21_every_dashboard_query_names_an_exposed_metric(client):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["templating"]["list"][0]["type"] == "datasource"
    _fleet_with_history()
    if apps.is_installed("clusters"):
        apps.get_model("clusters", "FailoverPlan").objects.create(
            cluster="east", computed_at=timezone.now(), capacity=1, level=1)
    exposed = {name for name, _ in samples(scrape(client))}
    queries = exprs(dashboard)
    assert len(queries) >= 15
    for expr in queries:
        names = METRIC.findall(expr)
        assert names, f"no hadash metric in {expr!r}"
        for name in names:
            if name.startswith("hadash_cluster_failover") and not apps.is_installed("clusters"):
                continue  # exposed only once the failover plans (R22) are stored
            assert name in exposed, f"{name} (in {expr!r}) is not exposed by /metrics"


def test_r21_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses every query as a recording rule's expression."""
    if not Path(PROMTOOL).exists():
        if CI:
            pytest.fail(f"promtool is missing at {PROMTOOL} (CI=true)")
        pytest.skip(f"promtool is missing at {PROMTOOL} (apt-get install prometheus)")
    queries = [q for q in exprs(json.loads(DASHBOARD.read_text()))
               if not q.startswith("label_values(")]
    rules = []
    for i, q in enumerate(queries):
        for var, value in GRAFANA_VARS.items():
            q = q.replace(var, value)
        rules.append({"record": f"hadash:dashboard_query_{i}", "expr": q})
    path = tmp_path / "rules.json"  # YAML is a superset of JSON
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(rules)} rules found" in proc.stdout
