"""`manage.py bench metrics` (R21, docs/benchmarks.md §7) runs end to end at a tiny
size, so the command cannot rot; no timing is asserted."""

from __future__ import annotations

import json

import pytest

from tests.test_bench import assert_cleaned_up, bench


@pytest.mark.slow
@pytest.mark.postgres_only
def test_bench_metrics_smoke():
    proc = bench("metrics", "--hosts", "5", "--vms-per-host", "2", "--incidents", "20",
                 "--requests", "3")
    assert "GET /metrics served, median" in proc.stdout, proc.stdout
    assert "ceiling (401, same server)" in proc.stdout
    assert_cleaned_up(proc.stderr)


@pytest.mark.slow
@pytest.mark.postgres_only
def test_bench_metrics_json():
    proc = bench("metrics", "--hosts", "3", "--vms-per-host", "1", "--incidents", "4",
                 "--requests", "2", "--json")
    result = json.loads(proc.stdout)
    assert result["vms"] == 3 and result["incidents"] == 4
    assert result["samples"] > 100  # every family, with its every state
    assert result["served_ms"]["median"] > 0 and result["ceiling_ms"]["median"] > 0
