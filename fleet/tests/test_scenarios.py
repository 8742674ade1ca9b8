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


REFUSING = """\
name: refusals on the way
hosts: {h1: {}, h2: {}, h3: {}}
vms: {vm1: {host: h1, ha: true}}
events:
  - {at: 20, do: host h1 maintenance}
  - {at: 30, do: host h1 maintenance}
  - {at: 30, do: vm ghost stop}
  - {at: 30, do: config ping.interval zero}
  - {at: 40, do: host h2 power off}
expect:
  - {at: 30, action: host h1 maintenance, refused: true}
  - {at: 30, action: vm ghost stop, refused: true}
  - {at: 30, action: config ping.interval zero, refused: true}
  - {at: 160, vm: vm1, state: Running, host: h3, restarts: 1}
  - {at: 160, host: h1, resource_state: Maintenance}
"""


def test_refused_operator_action_is_recorded_and_the_scenario_goes_on(tmp_path):
    """Issue 8 part 9: an operator action hadash refuses never aborts the run: it is a
    REFUSED line with hadash's reason, later events and expectations still happen, and
    a refusal alone fails nothing."""
    path = tmp_path / "refusals.yaml"
    path.write_text(REFUSING)
    proc = run_scenario(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "REFUSED  t=30 host h1 maintenance — host h1 is already Maintenance" in out
    assert "REFUSED  t=30 vm ghost stop — unknown VM 'ghost'" in out
    assert "REFUSED  t=30 config ping.interval zero — ping.interval must be a whole number" in out
    assert "PASS  t=160 vm vm1 host=h3" in out and "FAIL" not in out
    # The first `host h1 maintenance` (t=20) was done: not a REFUSED line.
    assert "REFUSED  t=20" not in out


def test_action_expectation_fails_when_the_outcome_differs(tmp_path):
    """An `action:` expectation holds hadash to its answer both ways, and one for an
    action that has not happened yet is a FAIL, not a pass."""
    path = tmp_path / "wrong.yaml"
    path.write_text(
        "name: wrong on purpose\nhosts: {h1: {}, h2: {}}\nvms: {vm1: {host: h1}}\n"
        "events: [{at: 20, do: host h1 maintenance}, {at: 30, do: host h2 disable}]\n"
        "expect:\n"
        "  - {at: 20, action: host h1 maintenance, refused: true}\n"
        "  - {at: 25, action: host h2 disable, refused: false}\n"
    )
    proc = run_scenario(path, extra=["--json"])
    assert proc.returncode == 1
    import json

    (report,) = json.loads(proc.stdout)["scenarios"]
    assert [(e["found"], e["ok"]) for e in report["expectations"]] == [
        (False, False), ("not applied", False)]
    assert report["actions"] == [
        {"at": 20, "do": "host h1 maintenance", "outcome": "done", "message": ""},
        {"at": 30, "do": "host h2 disable", "outcome": "done", "message": ""},
    ]


def test_work_expectation_by_type(tmp_path):
    """`work: V, type: T` looks at V's work items of type T; without `type`, HA items
    only (the published format): a Migration is not counted there."""
    path = tmp_path / "types.yaml"
    path.write_text(
        "name: migration items\nhosts: {h1: {}, h2: {}}\nvms: {vm1: {host: h1}}\n"
        "events: [{at: 20, do: host h1 maintenance}]\n"
        "expect:\n"
        "  - {at: 30, work: vm1, type: Migration, step: Done, count: 1}\n"
        "  - {at: 30, work: vm1, count: 0}\n"
        "  - {at: 30, host: h1, resource_state: Maintenance}\n"
    )
    proc = run_scenario(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS  t=30 work (Migration) vm1 step=Done" in proc.stdout
    bad = tmp_path / "bad-type.yaml"
    bad.write_text("name: x\nhosts: {h1: {}}\nexpect: [{at: 5, work: vm1, type: Nap, count: 0}]\n")
    proc = run_scenario(bad)
    assert proc.returncode == 1 and "work type must be one of" in proc.stdout


def test_fault_on_an_undeclared_host_is_a_malformed_scenario(tmp_path):
    """A fault acts on a simulated machine: naming one the scenario does not declare is
    a mistake in the file (said at load time), unlike an operator action, which hadash
    refuses at run time."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nhosts: {h1: {}}\nevents: [{at: 5, do: host h9 power off}]\n")
    proc = run_scenario(bad)
    assert proc.returncode == 1
    assert "events[0]: no host 'h9' in 'hosts'" in proc.stdout


@pytest.mark.django_db
def test_operator_action_that_crashes_fails_the_scenario_but_not_the_run(monkeypatch):
    """A bug in hadash behind an operator action (simulated here by making the stop
    action raise) is not a refusal: the scenario fails, with the error — and the run
    still goes on to its later events and expectations."""
    from fleet import scenario
    from hadash.ha import actions

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(actions, "stop_vm", broken)
    data = {"name": "x", "config": {}, "hosts": {"h1": {}, "h2": {}},
            "vms": {"vm1": {"host": "h1", "ha": True}},
            "events": [{"at": 10, "do": "vm vm1 stop"},
                       {"at": 20, "do": "host h1 power off"}],
            "expect": [{"at": 150, "vm": "vm1", "host": "h2", "restarts": 1}]}
    result = scenario.Run(data, "<test>").run()
    assert [(a.at, a.outcome) for a in result.actions] == [(10, "error")]
    assert "RuntimeError: boom" in result.actions[0].message
    assert all(c.ok for c in result.checks) and not result.ok


@pytest.mark.django_db
def test_world_apply_raises_refused_for_tests():
    """Tests that drive a world call apply() directly and see the refusal."""
    from fleet import scenario
    from fleet.testing import world

    w = world({"hosts": {"h1": {}}})
    with pytest.raises(scenario.Refused, match="not in maintenance"):
        w.apply("host h1 cancel-maintenance")


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
            out["actions"] = [(a.at, a.do, a.outcome) for a in result.actions]
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
    assert fast["actions"] == slow["actions"]
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
             "config investigate.retry.interval 15",
             # operator actions, refused or not (R15, R15a)
             "host {h} maintenance", "host {h} cancel-maintenance", "vm {v} stop",
             "config migrate.retry.interval 25", "config ping.interval zero"]
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
    assert fast["actions"] == slow["actions"]
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
    run = _event_stream(path, every_second=False)
    assert run["violations"] == []
    # Operator actions in the story are done or refused, never a crash of hadash.
    assert [a for a in run["actions"] if a[2] == "error"] == []
