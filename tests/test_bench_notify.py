"""Smoke test of ``manage.py bench notify`` (R20's notification delay, issue 10): the
benchmark runs end to end at a tiny size — the real system, a webhook channel created
through the operator API, a host powered off, its incident's webhooks received by the
bench's own HTTP receiver — and leaves no database and no process behind. No timing is
asserted (numbers belong in docs/benchmarks.md)."""

from __future__ import annotations

import json

import pytest
from django.core.management import CommandError, call_command

from tests.test_bench import assert_cleaned_up, bench


def test_r20_bench_notify_rejects_bad_sizes():
    with pytest.raises(CommandError, match="--failures"):
        call_command("bench", "notify", "--hosts", "3", "--failures", "3")
    with pytest.raises(CommandError, match="--tests"):
        call_command("bench", "notify", "--tests", "0")


@pytest.mark.slow
@pytest.mark.postgres_only
def test_r20_bench_notify_smoke():
    """One power-off: the declared and opened notifications of its incident arrive at
    the receiver and are reported with the "send test" floor beside them."""
    proc = bench("notify", "--hosts", "4", "--vms", "8", "--failures", "1", "--clusters",
                 "1", "--start-delay", "0.1", "--tests", "2", "--json", timeout=900)
    result = json.loads(proc.stdout)
    assert result["benchmark"] == "notify"
    [failure] = result["failures"]
    assert failure["declared_s"] is not None and failure["opened_s"] is not None
    assert failure["ended"] in ("resolved", "failed")
    assert len(result["tests"]) == 2
    summary = result["summary"]
    assert summary["declared"]["median"] is not None
    assert summary["floor_test_round_trip"]["median"] is not None
    # opened, declared, the end and two tests at least, each delivered once, none lost
    assert result["receiver"]["messages"] >= 5
    assert result["deliveries"]["not_sent"] == 0
    # what the command prints without --json
    from bench.notify import report

    text = report(result)
    assert "declared (declared_at → webhook received)" in text, text
    assert "floor: send test" in text and f"| {failure['host']} " in text, text
    assert_cleaned_up(proc.stderr)

