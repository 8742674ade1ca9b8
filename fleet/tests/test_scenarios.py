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


SCENARIO_FILES = sorted(PUBLISHED.glob("*.yaml")) + sorted((ROOT / "scenarios").glob("*.yaml"))


class _Rollback(Exception):
    pass


def _event_stream(path, every_second):
    """Run a scenario in the test database and return everything that happened, then
    roll it all back."""
    from django.db import transaction

    from fleet import scenario
    from hadash.models import Event

    out = {}
    try:
        with transaction.atomic():
            result = scenario.Run(scenario.load(path), str(path)).run(every_second=every_second)
            out["events"] = list(Event.objects.order_by("id").values_list(
                "time", "subject", "subject_name", "event", "old", "new"))
            out["checks"] = [(c.describe(), c.found, c.ok) for c in result.checks]
            out["violations"] = result.violations
            raise _Rollback
    except _Rollback:
        pass
    return out


@pytest.mark.django_db
@pytest.mark.parametrize("path", SCENARIO_FILES, ids=[p.name for p in SCENARIO_FILES])
def test_skipping_idle_seconds_changes_nothing(path):
    """The runner skips virtual seconds in which the engine has nothing due
    (hadash.ha.due); the run must be identical — every event at the same virtual
    time, every expectation with the same finding — to one that runs the sweep and
    the workers every single second, as production does."""
    fast = _event_stream(path, every_second=False)
    slow = _event_stream(path, every_second=True)
    assert fast["checks"] == slow["checks"]
    assert fast["violations"] == slow["violations"]
    assert fast["events"] == slow["events"]


def _random_scenario(seed):
    """A random failure story from the whole event vocabulary."""
    import random

    rnd = random.Random(seed)
    hosts = {f"h{i}": {"cpus": rnd.choice([2, 4, 16]), "cluster": rnd.choice(["c1", "c1", "c2"])}
             for i in range(1, 5)}
    vms = {f"vm{i}": {"host": rnd.choice(list(hosts)), "ha": rnd.random() < 0.7,
                      "priority": rnd.choice(["high", "medium", "low"])} for i in range(1, 7)}
    kinds = ["host {h} power off", "host {h} power on", "host {h} agent stop",
             "host {h} agent start", "host {h} network off", "host {h} network on",
             "host {h} start-fail 2", "bmc {h} fail", "bmc {h} ok", "vm {v} crash",
             "vm {v} vanish", "host {h} disable", "host {h} enable",
             "config restart.retry.interval 20", "config ha.max.hosts.down.ratio 0.8",
             "config investigate.retry.interval 15"]
    events = sorted(({"at": rnd.randrange(5, 300),
                      "do": rnd.choice(kinds).format(h=rnd.choice(list(hosts)),
                                                     v=rnd.choice(list(vms)))}
                     for _ in range(8)), key=lambda e: e["at"])
    return {"name": f"random {seed}", "config": {"ping.interval": rnd.choice([5, 10])},
            "hosts": hosts, "vms": vms, "events": events, "expect": [], "until": 400}


@pytest.mark.django_db
@pytest.mark.parametrize("seed", range(3))
def test_skipping_idle_seconds_changes_nothing_on_random_stories(seed, tmp_path):
    import yaml

    path = tmp_path / f"random-{seed}.yaml"
    path.write_text(yaml.safe_dump(_random_scenario(seed)))
    fast = _event_stream(path, every_second=False)
    slow = _event_stream(path, every_second=True)
    assert fast["violations"] == slow["violations"] == []
    assert fast["events"] == slow["events"]


@pytest.mark.django_db
@pytest.mark.parametrize("seed", range(100, 120))
def test_random_stories_never_run_a_vm_twice(seed, tmp_path):
    """SPEC §6 invariant, fuzzed: whatever happens — power loss, partitions, dead
    agents and BMCs, crashes, failed starts, operator actions — no VM is ever powered
    on on two hosts at once."""
    import yaml

    path = tmp_path / f"random-{seed}.yaml"
    path.write_text(yaml.safe_dump(_random_scenario(seed)))
    assert _event_stream(path, every_second=False)["violations"] == []
