"""Unmanaged VMs: discovery and adoption (PROTOCOL.md v1.1 "Names the server does not
know are listed to operators as unmanaged VMs, which they may adopt"; issue 9 part 2),
and the agent identity on the dashboard (issue 9 part 5)."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from hadash.models import ApiToken, Event
from hosts.agent import ingest, service
from hosts.models import Host
from hosts.tests import agent_fixtures
from vms import discovery
from vms.choices import VmState
from vms.models import UnmanagedVm, VMInstance

# Shared fixtures (hosts/tests/agent_fixtures.py).
EARLIER = agent_fixtures.EARLIER
hosts = agent_fixtures.hosts
_fresh_discovery = agent_fixtures._fresh_discovery

PING = "/api/agent/v1/ping"
API = "/api/v1"
XML = ("<domain type='kvm'><name>{n}</name><vcpu>3</vcpu>"
       "<memory unit='KiB'>1048576</memory></domain>")


def ping(client, host, entries):
    vms = []
    for e in entries:
        if isinstance(e, tuple):
            vms.append({"name": e[0], "power_state": e[1]})
        else:
            vms.append(e)
    r = client.post(PING, data=json.dumps({"vms": vms}), content_type="application/json",
                    HTTP_AUTHORIZATION=f"Bearer {host.token}")
    assert r.status_code == 200, r.content
    return r


def api_for(username, **kw):
    user = get_user_model().objects.create_user(username, **kw)
    c = APIClient()
    c.credentials(HTTP_AUTHORIZATION=f"Bearer {ApiToken.issue(user)[1]}")
    return c


@pytest.fixture
def admin_api(db):
    return api_for("ops", is_staff=True)


@pytest.fixture
def reader_api(db):
    return api_for("viewer")


def listed_names():
    return sorted((u.host.name, u.name, u.power_state)
                  for u in discovery.listed(now=timezone.now()))


# --- discovery ------------------------------------------------------------------


@pytest.mark.django_db
def test_unknown_names_are_listed_and_disappear_when_no_longer_reported(client, hosts,
                                                                         reader_api):
    """Names a host reports that hadash does not know are unmanaged VMs (host, power
    state, first and last seen), in the API; a name its host stops reporting leaves the
    list; a managed name is never listed."""
    a, b = hosts
    ping(client, a, [("web-1", "PowerOn"), ("legacy-1", "PowerOn"), ("legacy-2", "PowerOff")])
    ping(client, b, [("legacy-1", "PowerOn")])
    assert listed_names() == [("kvm-01", "legacy-1", "PowerOn"),
                              ("kvm-01", "legacy-2", "PowerOff"),
                              ("kvm-02", "legacy-1", "PowerOn")]
    shown = reader_api.get(f"{API}/unmanaged-vms").json()
    assert {(u["host"], u["name"]) for u in shown} == {
        ("kvm-01", "legacy-1"), ("kvm-01", "legacy-2"), ("kvm-02", "legacy-1")}
    assert all(u["last_seen"] and u["first_seen"] and u["has_definition"] is False
               for u in shown)
    # legacy-2 goes away on kvm-01; legacy-1 powers off there.
    ping(client, a, [("web-1", "PowerOn"), ("legacy-1", "PowerOff")])
    assert listed_names() == [("kvm-01", "legacy-1", "PowerOff"),
                              ("kvm-02", "legacy-1", "PowerOn")]
    ping(client, b, [])
    assert listed_names() == [("kvm-01", "legacy-1", "PowerOff")]


@pytest.mark.django_db
def test_an_unchanged_report_costs_no_discovery_query(client, hosts):
    """Cheap on the ping path: a host's report identical to its last one does not look
    at vm_unmanaged or vm_instance again for discovery (until the refresh)."""
    a = hosts[0]
    ping(client, a, [("web-1", "PowerOn"), ("legacy-1", "PowerOn")])
    with CaptureQueriesContext(connection) as q:
        ping(client, a, [("web-1", "PowerOn"), ("legacy-1", "PowerOn")])
    assert not [s for s in q.captured_queries if "vm_unmanaged" in s["sql"]]
    # After the refresh period its last_seen moves on.
    first = UnmanagedVm.objects.get(name="legacy-1").last_seen
    later = timezone.now() + discovery.REFRESH + dt.timedelta(seconds=1)
    from hosts.agent import service as svc
    svc.ping(Host.objects.get(pk=a.pk), [("web-1", "PowerOn"), ("legacy-1", "PowerOn")],
             now=later)
    assert UnmanagedVm.objects.get(name="legacy-1").last_seen == later > first


@pytest.mark.django_db
def test_the_batched_ingest_records_unknown_names_too(hosts):
    """Websocket pings (hosts.agent.ingest): the steady path records unknown names
    from what it already read, and a definition of an unknown VM is kept with it."""
    a, b = hosts
    now = timezone.now()
    report_b = service.VmReport([("legacy-9", "PowerOn")],
                                {"legacy-9": ("libvirt-xml", XML.format(n="legacy-9"))})
    results = ingest.apply_batch([(a.token, [("web-1", "PowerOn"), ("legacy-1", "PowerOn")]),
                                  (b.token, report_b)], now=now)
    assert results == [10, 10]
    assert listed_names() == [("kvm-01", "legacy-1", "PowerOn"),
                              ("kvm-02", "legacy-9", "PowerOn")]
    assert UnmanagedVm.objects.get(name="legacy-9").definition_xml == XML.format(n="legacy-9")


@pytest.mark.django_db
def test_rows_of_a_silent_host_expire(client, hosts):
    a = hosts[0]
    ping(client, a, [("legacy-1", "PowerOn")])
    UnmanagedVm.objects.update(last_seen=timezone.now() - discovery.EXPIRE
                               - dt.timedelta(seconds=1))
    assert listed_names() == []


# --- adoption ---------------------------------------------------------------------


@pytest.mark.django_db
def test_adopt_one_with_its_definition(client, hosts, admin_api):
    """Adopting registers the VM Running on the host that reports it (as POST
    /api/v1/vms does), with HA and priority as asked, its size read from the definition
    that host sent, and that definition stored; it leaves the unmanaged list."""
    a = hosts[0]
    ping(client, a, [("web-1", "PowerOn"),
                     {"name": "legacy-1", "power_state": "PowerOn",
                      "definition": {"format": "libvirt-xml", "xml": XML.format(n="legacy-1")}}])
    r = admin_api.post(f"{API}/unmanaged-vms/adopt", {"vms": [
        {"name": "legacy-1", "host": "kvm-01", "ha_enabled": True, "priority": "high"}]},
        format="json")
    assert r.status_code == 201, r.content
    (vm,) = r.json()
    assert (vm["name"], vm["state"], vm["host"], vm["ha_enabled"], vm["priority"],
            vm["cpus"], vm["memory_mb"], vm["has_definition"]) == (
        "legacy-1", "Running", "kvm-01", True, "high", 3, 1024, True)
    got = admin_api.get(f"{API}/vms/legacy-1/definition").json()
    assert got["xml"] == XML.format(n="legacy-1") and got["host"] == "kvm-01"
    assert listed_names() == []
    assert Event.objects.filter(subject_name="legacy-1", event="Registered").exists()
    # Its host's next report is the steady state of a managed VM: no HA, no new row.
    ping(client, a, [("web-1", "PowerOn"), ("legacy-1", "PowerOn")])
    assert VMInstance.objects.get(name="legacy-1").state == VmState.RUNNING
    assert not UnmanagedVm.objects.exists()


@pytest.mark.django_db
def test_adopt_in_bulk_and_a_powered_off_vm_is_adopted_stopped(client, hosts, admin_api):
    a, b = hosts
    ping(client, a, [("web-1", "PowerOn"), ("legacy-1", "PowerOn"), ("legacy-2", "PowerOff")])
    ping(client, b, [("legacy-3", "PowerOn")])
    r = admin_api.post(f"{API}/unmanaged-vms/adopt", {"vms": [
        {"name": "legacy-1", "host": "kvm-01", "cpus": 2, "memory_mb": 2048},
        {"name": "legacy-2", "host": "kvm-01", "cpus": 1, "memory_mb": 512,
         "ha_enabled": True},
        {"name": "legacy-3", "host": "kvm-02", "cpus": 4, "memory_mb": 4096,
         "priority": "low"},
    ]}, format="json")
    assert r.status_code == 201, r.content
    got = {v["name"]: (v["state"], v["host"], v["last_host"]) for v in r.json()}
    assert got == {"legacy-1": ("Running", "kvm-01", "kvm-01"),
                   "legacy-2": ("Stopped", None, "kvm-01"),
                   "legacy-3": ("Running", "kvm-02", "kvm-02")}
    assert listed_names() == []


@pytest.mark.django_db
@pytest.mark.parametrize("bad, word", [
    ({"name": "nowhere", "host": "kvm-01", "cpus": 1, "memory_mb": 1}, "no such unmanaged"),
    ({"name": "legacy-2", "host": "kvm-02", "cpus": 1, "memory_mb": 1}, "no such unmanaged"),
    ({"name": "web-1", "host": "kvm-01", "cpus": 1, "memory_mb": 1}, "no such unmanaged"),
    ({"name": "bad name!", "host": "kvm-01", "cpus": 1, "memory_mb": 1}, "name"),
    ({"name": "legacy-2", "host": "kvm-01"}, "cpus and memory_mb"),
    ({"name": "legacy-1", "host": "kvm-01", "cpus": 1, "memory_mb": 1}, "more than once"),
    ({"name": "legacy-2", "host": "kvm-01", "cpus": 1, "memory_mb": 1,
      "priority": "urgent"}, "priority"),
])
def test_bulk_adoption_is_refused_whole_on_one_bad_entry(client, hosts, admin_api, bad,
                                                         word):
    """All or nothing: one entry that cannot be adopted (unknown, reported by another
    host, already managed, an unsafe name, no size, a duplicate, a bad value) refuses
    the request with a 400 naming it, and nothing is adopted."""
    ping(client, hosts[0], [("web-1", "PowerOn"), ("legacy-1", "PowerOn"),
                            ("legacy-2", "PowerOn")])
    before = VMInstance.objects.count(), Event.objects.count()
    r = admin_api.post(f"{API}/unmanaged-vms/adopt", {"vms": [
        {"name": "legacy-1", "host": "kvm-01", "cpus": 1, "memory_mb": 1}, bad]},
        format="json")
    assert r.status_code == 400, r.content
    assert word in json.dumps(r.json())
    assert (VMInstance.objects.count(), Event.objects.count()) == before
    assert len(listed_names()) == 2


@pytest.mark.django_db
def test_adoption_needs_an_admin(client, hosts, reader_api):
    ping(client, hosts[0], [("legacy-1", "PowerOn")])
    r = reader_api.post(f"{API}/unmanaged-vms/adopt", {"vms": [
        {"name": "legacy-1", "host": "kvm-01", "cpus": 1, "memory_mb": 1}]}, format="json")
    assert r.status_code == 403
    assert not VMInstance.objects.filter(name="legacy-1").exists()


# --- dashboard -----------------------------------------------------------------------


@pytest.mark.django_db
def test_dashboard_lists_unmanaged_vms_and_adopts_the_checked_ones(client, hosts):
    """The dashboard's Unmanaged VMs page lists them with host and last seen; an admin
    adopts the checked ones (HA on, a priority) only with the confirmation."""
    a = hosts[0]
    ping(client, a, [("web-1", "PowerOn"), ("legacy-1", "PowerOn"), ("legacy-2", "PowerOn")])
    admin = get_user_model().objects.create_user("ops", is_staff=True)
    client.force_login(admin)
    page = client.get("/unmanaged").content.decode()
    assert 'data-vm="legacy-1" data-host="kvm-01"' in page
    assert 'value="kvm-01/legacy-2"' in page
    form = {"vm": ["kvm-01/legacy-1", "kvm-01/legacy-2"], "ha_enabled": "on",
            "priority": "high", "cpus": "2", "memory_mb": "1024"}
    client.post("/unmanaged/adopt", form)  # no confirmation
    assert not VMInstance.objects.filter(name__startswith="legacy").exists()
    r = client.post("/unmanaged/adopt", {**form, "confirm": "yes"}, follow=True)
    assert "Adopted 2 VM(s)" in r.content.decode()
    assert set(VMInstance.objects.filter(name__startswith="legacy").values_list(
        "name", "ha_enabled", "priority", "state")) == {
        ("legacy-1", True, "high", "Running"), ("legacy-2", True, "high", "Running")}


@pytest.mark.django_db
def test_dashboard_adoption_is_refused_to_a_read_only_user(client, hosts):
    ping(client, hosts[0], [("legacy-1", "PowerOn")])
    client.force_login(get_user_model().objects.create_user("viewer"))
    page = client.get("/unmanaged").content.decode()
    assert "legacy-1" in page and 'name="vm"' not in page
    r = client.post("/unmanaged/adopt", {"vm": ["kvm-01/legacy-1"], "cpus": "1",
                                         "memory_mb": "1", "confirm": "yes"})
    assert r.status_code == 403
    assert not VMInstance.objects.filter(name="legacy-1").exists()


@pytest.mark.django_db
def test_host_page_says_who_serves_the_host(client, hosts):
    """Issue 9 part 5: the host page tells a real hadash-agent from the simulator, with
    its version and hypervisor URI."""
    a, b = hosts
    Host.objects.filter(pk=a.pk).update(agent_name="hadash-agent", agent_version="1.1.0",
                                        agent_hypervisor_uri="qemu:///system")
    Host.objects.filter(pk=b.pk).update(agent_name="hadash-simulator", agent_version="1.1",
                                        agent_hypervisor_uri="simulated://kvm-02")
    client.force_login(get_user_model().objects.create_user("viewer"))
    page = client.get("/hosts/kvm-01").content.decode()
    assert 'data-agent-kind="agent"' in page and "real agent" in page
    assert "1.1.0" in page and "qemu:///system" in page
    page = client.get("/hosts/kvm-02").content.decode()
    assert 'data-agent-kind="simulator"' in page and "simulated://kvm-02" in page
