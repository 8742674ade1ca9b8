"""R21: GET /metrics — Prometheus text format behind a bearer token, values read from
the database (so every process serves the same), checked by promtool, matching the
database after a real engine run."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess

import pytest
from django.conf import settings
from django.test import override_settings
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from fleet.testing import world
from hadash.choices import IncidentKind, IncidentState, Step, VmOutcome, WorkType
from hadash.models import HaWork, Incident, IncidentVm
from hosts.choices import HostStatus
from hosts.models import Host
from metrics.counters import inc
from vms.choices import VmState
from vms.models import VMInstance

pytestmark = pytest.mark.django_db
CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}
PROMTOOL = os.environ.get("HADASH_PROMTOOL") or shutil.which("promtool") or "/usr/bin/promtool"


def scrape(client, token=None) -> str:
    token = settings.HADASH_METRICS_TOKEN if token is None else token
    response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    return response.content.decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of a scrape."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(got, name, **labels) -> float:
    return got[(name, frozenset(labels.items()))]


# --- the token -------------------------------------------------------------------------

def test_r21_metrics_needs_the_bearer_token(client):
    """No token or a wrong one: 401 with a JSON error, no metrics."""
    for headers in ({}, {"HTTP_AUTHORIZATION": "Bearer wrong"},
                    {"HTTP_AUTHORIZATION": f"Basic {settings.HADASH_METRICS_TOKEN}"}):
        response = client.get("/metrics", **headers)
        assert response.status_code == 401
        assert "HADASH_METRICS_TOKEN" in response.json()["error"]
        assert response["WWW-Authenticate"].startswith("Bearer")
        assert b"hadash_hosts" not in response.content


@override_settings(HADASH_METRICS_TOKEN="")
def test_r21_metrics_without_a_configured_token_is_refused_with_how_to_fix(client):
    response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer ")
    assert response.status_code == 403
    assert "set HADASH_METRICS_TOKEN" in response.json()["error"]


def test_r21_metrics_refuses_other_methods_with_json(client):
    response = client.post("/metrics", HTTP_AUTHORIZATION=f"Bearer {settings.HADASH_METRICS_TOKEN}")
    assert response.status_code == 405
    assert "use GET" in response.json()["error"]


# --- the format --------------------------------------------------------------------------

def test_r21_promtool_accepts_the_output(client):
    """`promtool check metrics` (Prometheus' own linter) finds nothing to say about a
    scrape with hosts, VMs, HA items, incidents and counters in it."""
    if not os.path.exists(PROMTOOL):
        if CI:
            pytest.fail(f"promtool is missing at {PROMTOOL} (CI=true: apt-get install "
                        "prometheus)")
        pytest.skip(f"promtool is missing at {PROMTOOL} (apt-get install prometheus; "
                    "scripts/setup installs it as root)")
    _fleet_with_history()
    text = scrape(client)
    proc = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), (
        proc.stdout + proc.stderr)


def test_r21_names_follow_prometheus_conventions(client):
    _fleet_with_history()
    for family in text_string_to_metric_families(scrape(client)):
        assert family.name.startswith("hadash_")
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        else:
            assert not any(s.name.endswith("_total") for s in family.samples), family.name


# --- the values --------------------------------------------------------------------------

def _fleet_with_history():
    """Hosts in two clusters, VMs in several states, an unfinished HA item and two
    finished incidents with known durations, counters counted."""
    now = timezone.now()
    a = Host.objects.create(name="kvm-a1", cluster="east", status=HostStatus.UP, cpus=8,
                            memory_mb=8192, last_ping=now)
    Host.objects.create(name="kvm-a2", cluster="east", status=HostStatus.DOWN)
    Host.objects.create(name="kvm-b1", cluster="west", status=HostStatus.UP,
                        last_ping=now - dt.timedelta(minutes=5))  # behind on ping
    vm1 = VMInstance.objects.create(name="vm-1", state=VmState.RUNNING, host=a)
    VMInstance.objects.create(name="vm-2", state=VmState.RUNNING, host=a)
    VMInstance.objects.create(name="vm-3", state=VmState.STOPPED)
    HaWork.objects.create(instance=vm1, vm_type="User", type=WorkType.HA, reason="HostDown",
                          step=Step.INVESTIGATING, state="Running", update_count=0,
                          time_to_try=now, created=now, updated=now)
    t0 = now - dt.timedelta(hours=1)
    host_incident = Incident.objects.create(
        kind=IncidentKind.HOST, state=IncidentState.RESOLVED, host_name="kvm-a2",
        cluster="east", title="kvm-a2 down", started_at=t0,
        detected_at=t0 + dt.timedelta(seconds=27), declared_at=t0 + dt.timedelta(seconds=40),
        fenced_at=t0 + dt.timedelta(seconds=43), resolved_at=t0 + dt.timedelta(seconds=70),
        updated=now)
    IncidentVm.objects.create(incident=host_incident, vm_name="vm-1",
                              outcome=VmOutcome.RESTARTED, down_since=t0,
                              running_at=t0 + dt.timedelta(seconds=55))
    IncidentVm.objects.create(incident=host_incident, vm_name="vm-9",
                              outcome=VmOutcome.PENDING, down_since=t0)  # not back yet
    Incident.objects.create(
        kind=IncidentKind.VM, state=IncidentState.OPEN, vm_name="vm-2", title="vm-2 off",
        started_at=t0, detected_at=t0 + dt.timedelta(seconds=3), updated=now)
    inc("fences", outcome="ok")
    inc("restarts", outcome="ok")
    inc("restarts", outcome="failed")
    inc("pings_ingested", 1200)
    inc("notifications", outcome="sent")


def test_r21_state_gauges_and_counters_match_the_database(client):
    _fleet_with_history()
    got = samples(scrape(client))
    # Hosts by cluster and status: every status present for every cluster.
    assert value(got, "hadash_hosts", cluster="east", status="Up") == 1
    assert value(got, "hadash_hosts", cluster="east", status="Down") == 1
    assert value(got, "hadash_hosts", cluster="west", status="Up") == 1
    assert value(got, "hadash_hosts", cluster="west", status="Down") == 0
    assert sum(1 for n, _ in got if n == "hadash_hosts") == 2 * len(HostStatus.values)
    assert value(got, "hadash_hosts_behind_on_ping", cluster="west") == 1
    assert value(got, "hadash_hosts_behind_on_ping", cluster="east") == 0
    assert value(got, "hadash_vms", state="Running") == 2
    assert value(got, "hadash_vms", state="Stopped") == 1
    assert value(got, "hadash_vms", state="Migrating") == 0
    assert value(got, "hadash_ha_items", type="HA", step="Investigating") == 1
    assert value(got, "hadash_ha_items", type="HA", step="Restarting") == 0
    assert ("hadash_ha_items", frozenset({("type", "HA"), ("step", "Done")})) not in got
    assert value(got, "hadash_open_incidents", kind="vm", state="Open") == 1
    assert value(got, "hadash_open_incidents", kind="host", state="Open") == 0
    # Counters, summed over the rows of every process.
    assert value(got, "hadash_fences_total", outcome="ok") == 1
    assert value(got, "hadash_fences_total", outcome="failed") == 0
    assert value(got, "hadash_restarts_total", outcome="failed") == 1
    assert value(got, "hadash_pings_ingested_total") == 1200
    assert value(got, "hadash_notifications_total", outcome="sent") == 1
    assert value(got, "hadash_notifications_total", outcome="retried") == 0
    # No engine loop runs in this test: the sweeper is down; mode armed by default.
    assert value(got, "hadash_sweeper_up") == 0
    assert value(got, "hadash_ha_mode", mode="armed") == 1
    assert value(got, "hadash_ha_mode", mode="observe") == 0
    build = [labels for n, labels in got if n == "hadash_build_info"]
    assert len(build) == 1 and dict(build[0])["django"].startswith("5.2")


def test_r18_r21_histograms_from_the_incident_tables(client):
    """Detection 27 s (host) and 3 s (VM); fence 3 s after HostDown; downtime 55 s for
    the VM back Running — the one still down is not counted."""
    _fleet_with_history()
    got = samples(scrape(client))
    h = "hadash_incident_detection_seconds"
    assert value(got, h + "_count", kind="host") == 1
    assert value(got, h + "_sum", kind="host") == 27
    assert value(got, h + "_bucket", kind="host", le="25.0") == 0
    assert value(got, h + "_bucket", kind="host", le="30.0") == 1
    assert value(got, h + "_bucket", kind="vm", le="5.0") == 1
    f = "hadash_incident_fence_seconds"
    assert value(got, f + "_count") == 1 and value(got, f + "_sum") == 3
    assert value(got, f + "_bucket", le="2.0") == 0
    assert value(got, f + "_bucket", le="5.0") == 1
    d = "hadash_vm_downtime_seconds"
    assert value(got, d + "_count", kind="host") == 1
    assert value(got, d + "_sum", kind="host") == 55
    assert value(got, d + "_bucket", kind="host", le="45.0") == 0
    assert value(got, d + "_bucket", kind="host", le="60.0") == 1
    assert value(got, d + "_count", kind="vm") == 0


@pytest.mark.django_db(transaction=True)
def test_r21_values_match_the_database_after_a_real_engine_run(client):
    """A host loses power under the real engine (simulated fleet, virtual clock): the
    scrape shows it Down, its HA VM Running elsewhere, and every incident the engine
    recorded in the histograms."""
    w = world({"config": {"ping.interval": 10, "ping.timeout": 2.5},
               "hosts": {"h1": {}, "h2": {}, "h3": {}},
               "vms": {"vm1": {"host": "h1", "ha": True}, "vm2": {"host": "h1"},
                       "vm3": {"host": "h2", "ha": True}}})
    before = samples(scrape(client))
    assert value(before, "hadash_hosts", cluster="c1", status="Up") == 3
    assert value(before, "hadash_vms", state="Running") == 3
    w.fleet.power_off("h1")
    w.advance_to(120)
    got = samples(scrape(client))
    assert Host.objects.get(name="h1").status == HostStatus.DOWN
    assert value(got, "hadash_hosts", cluster="c1", status="Down") == 1
    assert value(got, "hadash_hosts", cluster="c1", status="Up") == 2
    for state in VmState.values:
        assert value(got, "hadash_vms", state=state) == \
            VMInstance.objects.filter(state=state).count()
    assert value(got, "hadash_vms", state="Running") == 2  # vm1 restarted, vm3
    assert sum(v for (n, _), v in got.items() if n == "hadash_ha_items") == \
        HaWork.objects.unfinished().count()
    detected = Incident.objects.filter(started_at__isnull=False).count()
    assert sum(v for (n, _), v in got.items()
               if n == "hadash_incident_detection_seconds_count") == detected
    back = IncidentVm.objects.filter(down_since__isnull=False, running_at__isnull=False)
    assert sum(v for (n, _), v in got.items() if n == "hadash_vm_downtime_seconds_count") \
        == back.count()
    assert sum(v for (n, _), v in got.items() if n == "hadash_vm_downtime_seconds_sum") \
        == pytest.approx(sum(iv.downtime for iv in back))


def test_r21_r22_failover_capacity_per_cluster_from_the_stored_plans(client):
    from django.apps import apps

    if not apps.is_installed("clusters"):
        pytest.skip("the clusters app (R22 failover plans) is not installed")
    plan = apps.get_model("clusters", "FailoverPlan")
    now = timezone.now()
    plan.objects.create(cluster="east", computed_at=now, capacity=2, level=1)
    plan.objects.create(cluster="west", computed_at=now, capacity=0, level=1)
    got = samples(scrape(client))
    assert value(got, "hadash_cluster_failover_capacity", cluster="east") == 2
    assert value(got, "hadash_cluster_failover_capacity", cluster="west") == 0
    assert value(got, "hadash_cluster_failover_level", cluster="west") == 1
