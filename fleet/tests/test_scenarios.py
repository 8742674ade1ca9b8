"""The scenario runner, run as a user runs it (`manage.py scenario`).

The acceptance scenarios themselves (../shared/scenarios and the project's own in
scenarios/) are run by scripts/test once per test run — the runner always uses its own
temporary SQLite databases, so running them again under each pytest database would
only repeat them. Here: the runner's own behaviour, plus the project's scenarios."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = ROOT.parent / "shared" / "scenarios"


def run_scenario(*paths, extra=()):
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "scenario", *map(str, paths), *extra],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )


@pytest.mark.skipif(not PUBLISHED.is_dir(), reason="../shared/scenarios is not beside the checkout")
def test_published_scenario_passes():
    """One published scenario end to end: exit 0, PASS lines, no FAIL."""
    proc = run_scenario(PUBLISHED / "001-host-power-loss.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout
    assert proc.stdout.count("PASS") == 16  # 15 expectations + the invariant


def test_a_failing_expectation_fails_the_run(tmp_path):
    """The runner must not pass what does not hold (scenarios README): exit 1 and a
    FAIL line saying what was expected and what was found."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: wrong on purpose\nhosts: {h1: {}, h2: {}}\nvms: {vm1: {host: h1, ha: true}}\n"
        "events: [{at: 30, do: host h1 power off}]\n"
        "expect: [{at: 120, vm: vm1, host: h1}]\n"
    )
    proc = run_scenario(bad)
    assert proc.returncode == 1
    assert "FAIL  t=120 vm vm1 host=h1 — found h2" in proc.stdout


def test_json_report(tmp_path):
    ok = tmp_path / "ok.yaml"
    ok.write_text(
        "name: stays up\nhosts: {h1: {}}\nvms: {vm1: {host: h1}}\n"
        "expect: [{at: 30, host: h1, status: Up}, {at: 30, vm: vm1, state: Running}]\n"
    )
    proc = run_scenario(ok, extra=["--json"])
    assert proc.returncode == 0, proc.stderr
    import json

    report = json.loads(proc.stdout)
    assert report["ok"] is True
    assert [e["found"] for e in report["scenarios"][0]["expectations"]] == ["Up", "Running"]


def test_malformed_scenario_is_reported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nhosts: {h1: {}}\nevents: [{at: 5, do: host h1 explode}]\n")
    proc = run_scenario(bad)
    assert proc.returncode == 1
    assert "unknown event 'host h1 explode'" in proc.stdout
