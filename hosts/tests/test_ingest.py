"""Batched ping ingestion (hosts.agent.ingest): a batch of steady pings is a couple of
UPDATEs, and any ping that may change state takes the full path (R1, R8, R9) — so a
batch ends in exactly the state one-by-one pings would have left."""

import datetime as dt

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from fleet.testing import world
from hadash.models import Event, HaWork
from hosts.agent import ingest
from hosts.models import Host
from vms.models import VMInstance

pytestmark = pytest.mark.django_db


def fleet_world(n_hosts=20, vms_per_host=10):
    hosts = {f"h{i:02}": {"cpus": 64} for i in range(n_hosts)}
    vms = {f"h{i:02}-vm{j}": {"host": f"h{i:02}", "ha": j % 2 == 0}
           for i in range(n_hosts) for j in range(vms_per_host)}
    return world({"hosts": hosts, "vms": vms})


def tokens():
    # The scenario world connected the hosts; issue fresh tokens as a reconnect would.
    out = {}
    for h in Host.objects.all():
        h.token_generation += 1
        tok = h.agent_token()
        h.token_hash = Host.hash_token(tok)
        h.save(update_fields=["token_generation", "token_hash"])
        out[h.name] = tok
    return out


def test_steady_batch_is_a_few_statements_and_refreshes_every_host():
    w = fleet_world()
    toks = tokens()
    before = timezone.now() - dt.timedelta(seconds=1)
    Host.objects.update(last_ping=before)
    items = [(toks[h.name], h.report()) for h in w.fleet.hosts.values()]
    events = Event.objects.count()
    with CaptureQueriesContext(connection) as q:
        results = ingest.apply_batch(items)
    assert results == [10] * 20
    assert len(q.captured_queries) <= 8  # not ~8 per ping
    assert not Host.objects.filter(last_ping=before).exists()
    assert Event.objects.count() == events  # nothing changed state
    assert all(v.power_state_update_time > before for v in VMInstance.objects.all())


def test_mixed_batch_takes_the_full_path_where_state_changes():
    """R9 via a batch: a crashed HA VM gets its HA item and event; a revoked token is
    refused; the steady pings around them are applied."""
    w = fleet_world(n_hosts=3, vms_per_host=2)
    toks = tokens()
    w.fleet.vm_crash("h01-vm0")
    items = [(toks[h.name], h.report()) for h in w.fleet.hosts.values()]
    items.append(("not-a-token", []))
    results = ingest.apply_batch(items)
    assert results[:3] == [10, 10, 10]
    assert isinstance(results[3], ingest.TokenRevoked)
    vm = VMInstance.objects.get(name="h01-vm0")
    assert vm.power_state == "PowerOff"
    assert HaWork.objects.filter(instance=vm, reason="VmPowerOff").count() == 1
    assert Event.objects.filter(vm=vm, event="PowerStateChanged").exists()


def test_missing_vm_goes_the_full_path():
    """R8 via a batch: a VM left out of its host's report is judged, not confirmed."""
    w = fleet_world(n_hosts=2, vms_per_host=2)
    toks = tokens()
    w.fleet.vm_vanish("h00-vm1")
    VMInstance.objects.update(power_state_update_time=timezone.now() - dt.timedelta(minutes=5))
    ingest.apply_batch([(toks[h.name], h.report()) for h in w.fleet.hosts.values()])
    assert VMInstance.objects.get(name="h00-vm1").power_state == "PowerReportMissing"
    assert VMInstance.objects.get(name="h00-vm0").power_state == "PowerOn"


def test_a_host_coming_back_from_alert_is_brought_up_by_a_batched_ping():
    """R6 via a batch: a ping from an Alert host brings it Up, with its event."""
    w = fleet_world(n_hosts=2, vms_per_host=1)
    toks = tokens()
    Host.objects.filter(name="h00").update(status="Alert")
    ingest.apply_batch([(toks["h00"], w.fleet.host("h00").report())])
    assert Host.objects.get(name="h00").status == "Up"
    assert Event.objects.filter(host__name="h00", event="Ping", new="Up").exists()
