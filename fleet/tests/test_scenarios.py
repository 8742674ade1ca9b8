"""The acceptance scenarios (published in ../shared/scenarios and the project's own in
scenarios/) run through `manage.py scenario`, as a user runs them."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted((ROOT.parent / "shared" / "scenarios").glob("*.yaml")) + sorted(
    (ROOT / "scenarios").glob("*.yaml")
)


def run_scenario(*paths, extra=()):
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "scenario", *map(str, paths), *extra],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_scenario_passes(path):
    proc = run_scenario(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout
    assert "PASS" in proc.stdout


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
