"""Operator REST API (PROTOCOL.md, "Operator API"): the shapes other programs rely on,
authentication (API token or session, 401 without), read-only users vs staff, the
operator actions, and the OpenAPI document at /api/v1/openapi.json."""

from __future__ import annotations

import datetime as dt
import json
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone
from rest_framework.test import APIClient

from hadash import config
from hadash.choices import Reason, Severity, Step, Subject, WorkType
from hadash.events import record_event
from hadash.models import ApiToken, Event, HaWork
from hadash.testing import token_client
from hosts.choices import HostStatus, ResourceState
from hosts.models import Host
from vms.choices import PowerState, VmState
from vms.models import VMInstance

pytestmark = pytest.mark.django_db

API = "/api/v1"
VM_KEYS = {"name", "state", "power_state", "host", "last_host", "ha_enabled", "priority",
           "cpus", "memory_mb"}
HOST_KEYS = {"name", "status", "resource_state", "cluster", "last_ping", "cpus", "memory_mb"}
WORK_KEYS = {"id", "vm", "type", "step", "reason", "tried", "host", "time_to_try"}
EVENT_KEYS = {"id", "time", "subject", "subject_name", "event", "field", "old", "new",
              "reason", "message", "alert", "severity", "acknowledged_at"}


# --- fixtures -----------------------------------------------------------------


def make_host(name="kvm-01", **kw) -> Host:
    fields = dict(status=HostStatus.UP, resource_state=ResourceState.ENABLED, cluster="c1",
                  cpus=32, memory_mb=131072, last_ping=timezone.now(),
                  agent_url=f"http://{name}:8250")
    fields.update(kw)
    return Host.objects.create(name=name, **fields)


def make_vm(name, host, **kw) -> VMInstance:
    fields = dict(state=VmState.RUNNING, power_state=PowerState.POWER_ON, host=host,
                  last_host=host, power_host=host, cpus=2, memory_mb=4096)
    fields.update(kw)
    return VMInstance.objects.create(name=name, **fields)


def make_work(vm, *, type=WorkType.HA, step=Step.DONE, reason=Reason.HOST_DOWN,
              tried=0) -> HaWork:
    now = timezone.now()
    return HaWork.objects.create(
        instance=vm, vm_type=vm.type, type=type, reason=reason, step=step, host=vm.host,
        state=vm.state, update_count=vm.update_count, time_to_try=now, tried=tried,
        created=now, updated=now,
    )


def event(subject=Subject.HOST, name="kvm-01", alert=False, **kw) -> Event:
    from django.db import transaction

    with transaction.atomic():
        return record_event(subject, None, name=name, event=kw.pop("event", "Test"),
                            alert=alert, **kw)


def state() -> dict:
    return {
        "hosts": list(Host.objects.order_by("pk").values()),
        "vms": list(VMInstance.objects.order_by("pk").values()),
        "work": list(HaWork.objects.order_by("pk").values()),
        "events": list(Event.objects.order_by("pk").values()),
    }


# --- authentication and permissions ------------------------------------------


@pytest.mark.parametrize(
    "method,path",
    [("get", "/vms"), ("get", "/hosts"), ("get", "/ha-work"), ("get", "/events"),
     ("get", "/config"), ("put", "/config/ha.workers"), ("post", "/vms"),
     ("post", "/hosts/kvm-01/disable")],
)
def test_unauthenticated_is_401(method, path):
    """PROTOCOL.md: the operator API takes a Bearer API token; none → 401."""
    make_host()
    before = state()
    r = getattr(APIClient(), method)(API + path, {"value": "8"}, format="json")
    assert r.status_code == 401
    assert "error" in r.json()
    assert r["WWW-Authenticate"] == "Bearer"
    assert state() == before


@pytest.mark.parametrize("header", ["Bearer wrong", "Bearer", "Bearer a b", "Token abc"])
def test_wrong_token_is_401(staff, header):
    """PROTOCOL.md: wrong credentials → 401."""
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)
    r = client.get(f"{API}/vms")
    assert r.status_code == 401
    assert set(r.json()) == {"error"}


def test_inactive_users_token_is_401(staff):
    client = token_client(staff)
    staff.is_active = False
    staff.save()
    assert client.get(f"{API}/vms").status_code == 401


def test_token_records_last_used(staff):
    client = token_client(staff)
    assert client.get(f"{API}/hosts").status_code == 200
    assert ApiToken.objects.get(user=staff).last_used is not None


def test_session_login_reads(staff):
    """PROTOCOL.md: the API also takes a logged-in (session) user, e.g. the dashboard."""
    client = APIClient()
    client.force_login(staff)
    assert client.get(f"{API}/hosts").status_code == 200


@pytest.mark.parametrize(
    "method,path,body",
    [("post", "/vms", {"name": "web-1", "host": "kvm-01", "cpus": 1, "memory_mb": 512}),
     ("put", "/config/ha.workers", {"value": "8"}),
     ("patch", "/hosts/kvm-01", {"tags": ["ssd"]}),
     ("post", "/hosts/kvm-01/disable", None),
     ("post", "/hosts/kvm-01/maintenance", None),
     ("post", "/vms/vm-1/stop", None),
     ("post", "/vms/vm-1/start", None),
     ("post", "/events/{alert}/acknowledge", None)],
)
def test_read_only_user_cannot_write(ro_api, method, path, body):
    """PROTOCOL.md: writes and actions need a staff user (403), nothing changes."""
    host = make_host()
    make_vm("vm-1", host)
    alert = event(alert=True)
    before = state()
    r = getattr(ro_api, method)(API + path.format(alert=alert.pk), body, format="json")
    assert r.status_code == 403
    assert "staff" in r.json()["error"]
    assert state() == before


def test_read_only_user_reads(ro_api):
    host = make_host()
    make_vm("vm-1", host)
    for path in ("/vms", "/vms/vm-1", "/hosts", "/hosts/kvm-01", "/ha-work", "/events",
                 "/config", "/config/ha.workers"):
        assert ro_api.get(API + path).status_code == 200, path


# --- VMs ----------------------------------------------------------------------


def test_register_vm(api):
    """PROTOCOL.md: POST /api/v1/vms registers a VM running on that host → 201 with it."""
    make_host()
    body = {"name": "web-1", "host": "kvm-01", "cpus": 2, "memory_mb": 4096,
            "ha_enabled": True, "priority": "high"}
    r = api.post(f"{API}/vms", body, format="json")
    assert r.status_code == 201, r.content
    data = r.json()
    assert VM_KEYS <= set(data)
    assert {k: data[k] for k in VM_KEYS} == {
        "name": "web-1", "state": "Running", "power_state": "PowerOn", "host": "kvm-01",
        "last_host": "kvm-01", "ha_enabled": True, "priority": "high", "cpus": 2,
        "memory_mb": 4096,
    }
    vm = VMInstance.objects.get(name="web-1")
    assert (vm.state, vm.power_state, vm.host.name) == ("Running", "PowerOn", "kvm-01")
    assert Event.objects.filter(subject="vm", subject_name="web-1").exists()


def test_register_vm_defaults(api):
    make_host()
    r = api.post(f"{API}/vms", {"name": "web-2", "host": "kvm-01", "cpus": 1,
                                "memory_mb": 512}, format="json")
    assert r.status_code == 201
    assert (r.json()["ha_enabled"], r.json()["priority"], r.json()["type"]) == (
        False, "medium", "User")


def test_register_vm_unknown_host_is_400_and_writes_nothing(api):
    """PROTOCOL.md: a rejected request changes nothing."""
    make_host()
    before = state()
    r = api.post(f"{API}/vms", {"name": "web-1", "host": "nope", "cpus": 2,
                                "memory_mb": 4096}, format="json")
    assert r.status_code == 400
    assert "nope" in r.json()["error"]
    assert state() == before


@pytest.mark.parametrize(
    "body,needle",
    [({"host": "kvm-01", "cpus": 2, "memory_mb": 1}, "name"),
     ({"name": "x", "host": "kvm-01", "cpus": 0, "memory_mb": 1}, "cpus"),
     ({"name": "x", "host": "kvm-01", "cpus": "two", "memory_mb": 1}, "cpus"),
     ({"name": "x", "host": "kvm-01", "cpus": 1, "memory_mb": 1, "priority": "urgent"},
      "priority"),
     ({"name": "x", "host": "kvm-01", "cpus": 1, "memory_mb": 1, "type": "Router"}, "type")],
)
def test_register_vm_bad_body_is_400(api, body, needle):
    make_host()
    before = state()
    r = api.post(f"{API}/vms", body, format="json")
    assert r.status_code == 400
    assert needle in r.json()["error"]
    assert needle in r.json()["details"]
    assert state() == before


def test_register_vm_duplicate_is_400(api):
    host = make_host()
    make_vm("web-1", host)
    before = state()
    r = api.post(f"{API}/vms", {"name": "web-1", "host": "kvm-01", "cpus": 1,
                                "memory_mb": 512}, format="json")
    assert r.status_code == 400
    assert "web-1" in r.json()["error"]
    assert state() == before


def test_malformed_json_is_400(api):
    r = api.post(f"{API}/vms", "{not json", content_type="application/json")
    assert r.status_code == 400
    assert set(r.json()) == {"error"}


def test_get_vm_shape(api):
    """PROTOCOL.md: GET /api/v1/vms/{name} → name, state, power_state, host, last_host,
    ha_enabled, priority, cpus, memory_mb (host names or null)."""
    old = make_host("kvm-00")
    make_vm("db-1", None, state=VmState.STOPPED, power_state=PowerState.POWER_OFF,
            last_host=old, power_host=None, ha_enabled=True, priority="low")
    r = api.get(f"{API}/vms/db-1")
    assert r.status_code == 200
    data = r.json()
    assert {k: data[k] for k in VM_KEYS} == {
        "name": "db-1", "state": "Stopped", "power_state": "PowerOff", "host": None,
        "last_host": "kvm-00", "ha_enabled": True, "priority": "low", "cpus": 2,
        "memory_mb": 4096,
    }
    assert api.get(f"{API}/vms/nope").status_code == 404
    assert "nope" in api.get(f"{API}/vms/nope").json()["error"]


def test_list_vms_filters(api):
    a, b = make_host("kvm-01"), make_host("kvm-02")
    make_vm("v1", a, ha_enabled=True)
    make_vm("v2", b)
    make_vm("v3", None, state=VmState.STOPPED, power_state=PowerState.POWER_OFF, last_host=b)
    names = lambda q="": [v["name"] for v in api.get(f"{API}/vms{q}").json()]  # noqa: E731
    assert names() == ["v1", "v2", "v3"]
    assert names("?state=Running") == ["v1", "v2"]
    assert names("?host=kvm-02") == ["v2"]
    assert names("?ha_enabled=true") == ["v1"]
    assert names("?ha_enabled=false") == ["v2", "v3"]
    assert names("?power_state=PowerOff") == ["v3"]
    assert names("?limit=1&offset=1") == ["v2"]
    r = api.get(f"{API}/vms?state=Runing")
    assert r.status_code == 400 and "state" in r.json()["error"]
    assert api.get(f"{API}/vms?limit=0").status_code == 400


def test_patch_vm_settings(api):
    host = make_host()
    make_vm("v1", host)
    r = api.patch(f"{API}/vms/v1", {"ha_enabled": True, "priority": "high"}, format="json")
    assert r.status_code == 200
    assert (r.json()["ha_enabled"], r.json()["priority"]) == (True, "high")
    ev = Event.objects.get(event="SettingsChanged", subject="vm")
    assert ev.reason == "ops"
    before = state()
    r = api.patch(f"{API}/vms/v1", {"state": "Stopped"}, format="json")
    assert r.status_code == 400 and "state" in r.json()["error"]
    assert state() == before


def test_stop_vm_queues_stop_work(api):
    """PROTOCOL.md: POST /api/v1/vms/{name}/stop queues a Stop work item (202)."""
    host = make_host()
    make_vm("v1", host)
    r = api.post(f"{API}/vms/v1/stop")
    assert r.status_code == 202, r.content
    data = r.json()
    assert WORK_KEYS <= set(data)
    assert (data["vm"], data["type"], data["host"]) == ("v1", "Stop", "kvm-01")
    assert HaWork.objects.filter(instance__name="v1", type=WorkType.STOP).count() == 1
    # A second stop while the first is open is refused as a conflict.
    before = state()
    r = api.post(f"{API}/vms/v1/stop")
    assert r.status_code == 409 and "error" in r.json()
    assert state() == before


def test_stop_stopped_vm_succeeds_and_changes_nothing(api):
    """R15a: stopping a VM that is already Stopped (nothing pending) succeeds and
    changes nothing: 200 with the VM, no work item, no event."""
    make_vm("v1", None, state=VmState.STOPPED, power_state=PowerState.POWER_OFF)
    before = state()
    r = api.post(f"{API}/vms/v1/stop")
    assert r.status_code == 200, r.content
    assert (r.json()["name"], r.json()["state"]) == ("v1", "Stopped")
    assert state() == before


def test_stop_stopped_vm_cancels_its_ha_item(api):
    """R15a: an operator stop cancels the VM's unfinished HA item even when the VM is
    already Stopped (then there is nothing to stop: 200 with the VM)."""
    host = make_host()
    vm = make_vm("v1", None, state=VmState.STOPPED, power_state=PowerState.POWER_OFF,
                 last_host=host)
    item = make_work(vm, step=Step.SCHEDULED)
    r = api.post(f"{API}/vms/v1/stop")
    assert r.status_code == 200, r.content
    assert r.json()["state"] == "Stopped"
    item.refresh_from_db()
    assert item.step == Step.CANCELLED
    assert not HaWork.objects.filter(instance=vm, type=WorkType.STOP).exists()


class FakeAgents:
    def __init__(self):
        self.started = []

    def start_vm(self, host, vm):
        self.started.append((host.name, vm.name))


def test_start_vm(api, monkeypatch):
    """PROTOCOL.md: POST /api/v1/vms/{name}/start starts a stopped VM (synchronous)."""
    from hadash.api import views
    from hadash.ha.engine import Engine

    agents = FakeAgents()
    monkeypatch.setattr(views, "production_engine", lambda: Engine(agents=agents, oob=None))
    host = make_host()
    make_vm("v1", None, state=VmState.STOPPED, power_state=PowerState.POWER_OFF,
            last_host=host, power_host=None)
    r = api.post(f"{API}/vms/v1/start")
    assert r.status_code == 200, r.content
    assert (r.json()["state"], r.json()["host"]) == ("Running", "kvm-01")
    assert agents.started == [("kvm-01", "v1")]
    r = api.post(f"{API}/vms/v1/start")
    assert r.status_code == 409 and "Running" in r.json()["error"]


# --- hosts --------------------------------------------------------------------


def test_get_host_shape(api):
    """PROTOCOL.md: GET /api/v1/hosts/{name} → name, status, resource_state, cluster,
    last_ping, cpus, memory_mb."""
    ping = dt.datetime(2026, 3, 1, 12, 0, 5, tzinfo=dt.UTC)
    host = make_host(last_ping=ping, tags="ssd,gpu", oobm_password="s3cret")
    make_vm("v1", host, cpus=4, memory_mb=8192)
    make_vm("v2", None, state=VmState.STOPPED, last_host=host)
    r = api.get(f"{API}/hosts/kvm-01")
    assert r.status_code == 200
    data = r.json()
    assert {k: data[k] for k in HOST_KEYS} == {
        "name": "kvm-01", "status": "Up", "resource_state": "Enabled", "cluster": "c1",
        "last_ping": "2026-03-01T12:00:05Z", "cpus": 32, "memory_mb": 131072,
    }
    assert (data["allocated_cpus"], data["allocated_memory_mb"], data["vm_count"]) == (
        4, 8192, 1)
    assert data["tags"] == ["ssd", "gpu"]
    assert data["oobm_password_set"] is True
    assert "s3cret" not in r.content.decode()
    assert "oobm_password" not in data
    r = api.get(f"{API}/hosts/nope")
    assert r.status_code == 404 and "nope" in r.json()["error"]


def test_list_hosts_filters(api):
    make_host("a", cluster="c1")
    make_host("b", cluster="c2", status=HostStatus.DOWN)
    make_host("c", cluster="c2", resource_state=ResourceState.MAINTENANCE)
    names = lambda q="": [h["name"] for h in api.get(f"{API}/hosts{q}").json()]  # noqa: E731
    assert names() == ["a", "b", "c"]
    assert names("?status=Down") == ["b"]
    assert names("?resource_state=Maintenance") == ["c"]
    assert names("?cluster=c2") == ["b", "c"]
    assert names("?cluster=c2&status=Up") == ["c"]
    assert api.get(f"{API}/hosts?status=down").status_code == 400


def test_patch_host_settings(api):
    """PROTOCOL.md: BMC settings are set by an operator (API), the password is never
    shown; each change is an event."""
    make_host()
    body = {"tags": ["ssd", "ha"], "oobm_enabled": True, "oobm_address": "https://10.0.1.11",
            "oobm_system_id": "kvm-01", "oobm_username": "root", "oobm_password": "pw"}
    r = api.patch(f"{API}/hosts/kvm-01", body, format="json")
    assert r.status_code == 200, r.content
    data = r.json()
    assert data["tags"] == ["ssd", "ha"]
    assert (data["oobm_enabled"], data["oobm_address"], data["oobm_password_set"]) == (
        True, "https://10.0.1.11", True)
    assert "oobm_password" not in data and "pw" not in json.dumps(data)
    host = Host.objects.get(name="kvm-01")
    assert (host.tags, host.oobm_password) == ("ssd,ha", "pw")
    ev = Event.objects.get(event="SettingsChanged")
    assert "oobm_password changed" in ev.message and "pw'" not in ev.message
    # tags also as a comma-separated string
    r = api.patch(f"{API}/hosts/kvm-01", {"tags": "gpu, ssd"}, format="json")
    assert r.json()["tags"] == ["gpu", "ssd"]


@pytest.mark.parametrize(
    "body,needle",
    [({"status": "Up"}, "status"),
     ({"oobm_address": "not a url"}, "oobm_address"),
     ({"oobm_enabled": True}, "oobm_address"),
     ({"tags": 5}, "tags")],
)
def test_patch_host_bad_body_is_400(api, body, needle):
    make_host()
    before = state()
    r = api.patch(f"{API}/hosts/kvm-01", body, format="json")
    assert r.status_code == 400
    assert needle in r.json()["error"]
    assert state() == before


def test_host_actions(api):
    """PROTOCOL.md: operator actions — disable, enable, maintenance, cancel-maintenance."""
    make_host()
    r = api.post(f"{API}/hosts/kvm-01/disable")
    assert r.status_code == 200 and r.json()["resource_state"] == "Disabled"
    r = api.post(f"{API}/hosts/kvm-01/enable")
    assert r.status_code == 200 and r.json()["resource_state"] == "Enabled"
    r = api.post(f"{API}/hosts/kvm-01/maintenance")
    assert r.status_code == 200
    assert r.json()["resource_state"] in ("PrepareForMaintenance", "Maintenance")
    before = state()
    r = api.post(f"{API}/hosts/kvm-01/enable")
    assert r.status_code == 409 and "maintenance" in r.json()["error"]
    assert state() == before
    r = api.post(f"{API}/hosts/kvm-01/cancel-maintenance")
    assert r.status_code == 200 and r.json()["resource_state"] == "Enabled"
    assert api.post(f"{API}/hosts/kvm-01/cancel-maintenance").status_code == 409
    assert api.post(f"{API}/hosts/nope/enable").status_code == 404
    assert Event.objects.filter(event="ResourceStateChanged", reason="ops").count() >= 4


def test_maintenance_queues_migrations(api):
    host = make_host()
    make_host("kvm-02")
    make_vm("v1", host)
    r = api.post(f"{API}/hosts/kvm-01/maintenance")
    assert r.status_code == 200
    assert r.json()["resource_state"] == "PrepareForMaintenance"
    work = api.get(f"{API}/ha-work?vm=v1").json()
    assert [w["type"] for w in work] == ["Migration"]


@pytest.mark.parametrize("status", [HostStatus.DOWN, HostStatus.ALERT, HostStatus.DISCONNECTED])
def test_maintenance_of_a_host_that_is_not_up_is_refused(api, status):
    """R15 / issue 10 item 7: maintenance live-migrates the running VMs, which needs the
    host Up; a Down, Alert or Disconnected host is refused (409) and nothing changes."""
    host = make_host(status=status)
    make_host("kvm-02")
    make_vm("v1", host)
    before = state()
    r = api.post(f"{API}/hosts/kvm-01/maintenance")
    assert r.status_code == 409
    assert f"host kvm-01 is {status}" in r.json()["error"] and "needs the host Up" in \
        r.json()["error"]
    assert state() == before


# --- HA work ------------------------------------------------------------------


def test_ha_work_filter_newest_first(api):
    """PROTOCOL.md: GET /api/v1/ha-work?vm={name} → that VM's items, newest first."""
    host = make_host()
    v1, v2 = make_vm("v1", host), make_vm("v2", host)
    first = make_work(v1, tried=1)
    make_work(v2)
    second = make_work(v1, type=WorkType.STOP, reason=Reason.OPERATOR)
    third = make_work(v1, step=Step.SCHEDULED, tried=2)
    r = api.get(f"{API}/ha-work?vm=v1")
    assert r.status_code == 200
    data = r.json()
    assert [w["id"] for w in data] == [third.pk, second.pk, first.pk]
    for w in data:
        assert WORK_KEYS <= set(w)
    assert {k: data[0][k] for k in WORK_KEYS - {"time_to_try"}} == {
        "id": third.pk, "vm": "v1", "type": "HA", "step": "Scheduled", "reason": "HostDown",
        "tried": 2, "host": "kvm-01",
    }
    assert data[0]["time_to_try"].endswith("Z")
    ids = lambda q: [w["id"] for w in api.get(f"{API}/ha-work?{q}").json()]  # noqa: E731
    assert ids("vm=v1&type=Stop") == [second.pk]
    assert ids("vm=v1&step=Scheduled") == [third.pk]
    assert ids("finished=false") == [third.pk]
    assert len(ids("")) == 4
    assert ids("vm=nope") == []
    assert api.get(f"{API}/ha-work?step=Bogus").status_code == 400


def test_ha_work_detail(api):
    host = make_host()
    item = make_work(make_vm("v1", host))
    r = api.get(f"{API}/ha-work/{item.pk}")
    assert r.status_code == 200 and r.json()["id"] == item.pk and r.json()["vm"] == "v1"
    assert api.get(f"{API}/ha-work/999999").status_code == 404


# --- events -------------------------------------------------------------------


def test_events_after_oldest_first(api):
    """PROTOCOL.md: GET /api/v1/events?after={id} → events with a greater id, oldest first."""
    evs = [event(name=f"h{i}") for i in range(5)]
    r = api.get(f"{API}/events?after={evs[1].pk}")
    assert r.status_code == 200
    data = r.json()
    assert [e["id"] for e in data] == [e.pk for e in evs[2:]]
    assert EVENT_KEYS <= set(data[0])
    assert data[0]["subject_name"] == "h2"
    assert [e["id"] for e in api.get(f"{API}/events?after={evs[1].pk}&limit=2").json()] == [
        evs[2].pk, evs[3].pk]
    assert api.get(f"{API}/events?after={evs[4].pk}").json() == []
    assert [e["id"] for e in api.get(f"{API}/events").json()] == [e.pk for e in evs[::-1]]
    assert [e["id"] for e in api.get(f"{API}/events?latest=true&limit=2").json()] == [
        evs[3].pk, evs[4].pk]
    assert api.get(f"{API}/events?limit=5001").status_code == 400
    assert api.get(f"{API}/events?after=x").status_code == 400


def test_events_filters_and_acknowledge(api):
    event()
    alert = event(alert=True, event="HostDown")
    vm_ev = event(subject=Subject.VM, name="v1")
    ids = lambda q: [e["id"] for e in api.get(f"{API}/events?{q}").json()]  # noqa: E731
    assert ids("alert=true") == [alert.pk]
    assert ids("subject=vm") == [vm_ev.pk]
    assert ids("alert=true&acknowledged=false") == [alert.pk]
    data = api.get(f"{API}/events?alert=true").json()[0]
    assert (data["alert"], data["severity"], data["acknowledged_at"]) == (
        True, Severity.CRITICAL, None)

    r = api.post(f"{API}/events/{alert.pk}/acknowledge")
    assert r.status_code == 200
    assert r.json()["acknowledged_at"] is not None and r.json()["acknowledged_by"] == "ops"
    first = r.json()["acknowledged_at"]
    assert api.post(f"{API}/events/{alert.pk}/acknowledge").json()["acknowledged_at"] == first
    assert ids("alert=true&acknowledged=false") == []
    r = api.post(f"{API}/events/{vm_ev.pk}/acknowledge")
    assert r.status_code == 400 and "not an alert" in r.json()["error"]
    assert api.post(f"{API}/events/999999/acknowledge").status_code == 404
    assert api.get(f"{API}/events/{alert.pk}").json()["id"] == alert.pk


# --- list totals and links (issue 10 item 7) -----------------------------------


def links(r) -> dict[str, str]:
    """rel → URL from a Link header (RFC 8288)."""
    out = {}
    for part in filter(None, (r.get("Link") or "").split(",")):
        url, rel = part.split(";")
        out[rel.strip().removeprefix('rel="').rstrip('"')] = url.strip()[1:-1]
    return out


def test_events_default_to_the_newest_first(api):
    """Issue 10 item 7: `events?limit=5` is the five newest events, newest first;
    `order=oldest` reads from the start; with `after` the feed stays oldest first
    (PROTOCOL.md)."""
    evs = [event(name=f"h{i}") for i in range(8)]
    ids = lambda q: [e["id"] for e in api.get(f"{API}/events?{q}").json()]  # noqa: E731
    assert ids("limit=5") == [e.pk for e in evs[:2:-1]]
    assert ids("limit=3&order=oldest") == [e.pk for e in evs[:3]]
    assert ids(f"after={evs[5].pk}") == [evs[6].pk, evs[7].pk]
    assert ids(f"after={evs[5].pk}&order=newest") == [evs[7].pk, evs[6].pk]
    assert ids("limit=2&offset=2") == [evs[5].pk, evs[4].pk]
    assert api.get(f"{API}/events?order=sideways").status_code == 400


def test_every_list_has_a_total_and_next_previous_links(api):
    """Issue 10 item 7: each list is still a JSON array (PROTOCOL.md) and says in
    X-Total-Count how many rows match and in Link where the next/previous pages are;
    following the links visits every row once."""
    h = make_host()
    for i in range(7):
        make_work(make_vm(f"vm-{i}", h))
    for i in range(5):
        event(name=f"e{i}")
    for path, total in (("/vms", 7), ("/ha-work", 7), ("/events", Event.objects.count())):
        url, seen, pages = f"{API}{path}?limit=3", [], 0
        prev = None
        while url:
            r = api.get(url)
            assert r.status_code == 200 and isinstance(r.json(), list)
            assert r["X-Total-Count"] == str(total), path
            got = links(r)
            if pages:
                assert "prev" in got and "offset=" in got["prev"]
            else:
                assert "prev" not in got
            seen += [row.get("id", row.get("name")) for row in r.json()]
            prev, url, pages = url, got.get("next"), pages + 1
        assert len(seen) == len(set(seen)) == total and pages == -(-total // 3), path
        assert prev is not None
    # Filters count too; the last page has no next link.
    r = api.get(f"{API}/vms?limit=3&state=Stopped")
    assert r.status_code == 200 and r["X-Total-Count"] == "0" and "Link" not in r
    r = api.get(f"{API}/hosts")
    assert r["X-Total-Count"] == "1" and "Link" not in r
    r = api.get(f"{API}/config")
    assert int(r["X-Total-Count"]) == len(r.json()) > 10
    for path in ("/unmanaged-vms", "/incidents", "/alerts"):
        r = api.get(f"{API}{path}?limit=1")
        assert r.status_code == 200 and r["X-Total-Count"] == "0", path
    # Past the end: an empty page that still counts and points back.
    r = api.get(f"{API}/vms?limit=3&offset=30")
    assert r.json() == [] and r["X-Total-Count"] == "7" and "prev" in links(r)


def test_list_headers_are_in_the_openapi_document():
    doc = json.loads(APIClient().get(f"{API}/openapi.json").content)
    for path in ("/api/v1/hosts", "/api/v1/vms", "/api/v1/ha-work", "/api/v1/events",
                 "/api/v1/unmanaged-vms", "/api/v1/config", "/api/v1/incidents",
                 "/api/v1/alerts"):
        headers = doc["paths"][path]["get"]["responses"]["200"]["headers"]
        assert {"X-Total-Count", "Link"} <= set(headers), path


# --- OpenAPI ------------------------------------------------------------------


def test_openapi_document():
    """PROTOCOL.md: the API describes itself as OpenAPI at /api/v1/openapi.json."""
    r = APIClient().get(f"{API}/openapi.json")
    assert r.status_code == 200
    doc = json.loads(r.content)
    assert doc["openapi"].startswith("3.")
    paths = doc["paths"]
    for p, methods in {
        "/api/v1/vms": {"get", "post"},
        "/api/v1/vms/{name}": {"get", "patch"},
        "/api/v1/vms/{name}/stop": {"post"},
        "/api/v1/vms/{name}/start": {"post"},
        "/api/v1/hosts": {"get"},
        "/api/v1/hosts/{name}": {"get", "patch"},
        "/api/v1/hosts/{name}/enable": {"post"},
        "/api/v1/hosts/{name}/disable": {"post"},
        "/api/v1/hosts/{name}/maintenance": {"post"},
        "/api/v1/hosts/{name}/cancel-maintenance": {"post"},
        "/api/v1/ha-work": {"get"},
        "/api/v1/ha-work/{id}": {"get"},
        "/api/v1/events": {"get"},
        "/api/v1/events/{id}/acknowledge": {"post"},
        "/api/v1/config": {"get"},
        "/api/v1/config/{key}": {"get", "put"},
    }.items():
        assert methods <= set(paths[p]), p
    assert doc["components"]["securitySchemes"]["BearerAuth"] == {
        "type": "http", "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["BearerAuth"]["description"],
    }
    assert {"BearerAuth": []} in paths["/api/v1/vms"]["get"]["security"]
    params = {p["name"] for p in paths["/api/v1/events"]["get"]["parameters"]}
    assert {"after", "limit", "subject", "alert"} <= params
    vm = doc["components"]["schemas"]["VM"]["properties"]
    assert VM_KEYS <= set(vm)
    assert not any(p.startswith("/api/agent") for p in paths)


def test_openapi_document_whatever_the_client_accepts():
    """The document is served to any Accept header; a POST is a JSON 405."""
    r = APIClient().get(f"{API}/openapi.json", HTTP_ACCEPT="text/html")
    assert r.status_code == 200 and json.loads(r.content)["openapi"].startswith("3.")
    r = APIClient().post(f"{API}/openapi.json")
    assert r.status_code == 405 and "POST" in r.json()["error"]


def test_openapi_schema_has_no_warnings(tmp_path):
    """The document generates without drf-spectacular warnings and validates."""
    call_command("spectacular", "--urlconf", "hadash.api.urls", "--fail-on-warn",
                 "--validate", "--file", str(tmp_path / "schema.yaml"))


# --- apitoken -----------------------------------------------------------------


def test_apitoken_command_prints_usable_token(staff):
    """PROTOCOL.md: `python manage.py apitoken USERNAME` prints a token."""
    out = StringIO()
    call_command("apitoken", "ops", stdout=out)
    key = out.getvalue().strip()
    assert key and "\n" not in key
    assert ApiToken.objects.get(user=staff).key_hash == ApiToken.hash(key)
    assert key not in str(list(ApiToken.objects.values()))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    assert client.get(f"{API}/hosts").status_code == 200


def test_apitoken_unknown_user():
    with pytest.raises(CommandError, match="no user named 'ghost'"):
        call_command("apitoken", "ghost", stdout=StringIO())
    assert not ApiToken.objects.exists()


def test_apitoken_create_makes_staff_user():
    out = StringIO()
    call_command("apitoken", "robot", "--create", stdout=out, stderr=StringIO())
    user = get_user_model().objects.get(username="robot")
    assert user.is_staff and not user.has_usable_password()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {out.getvalue().strip()}")
    make_host()
    assert client.post(f"{API}/hosts/kvm-01/disable").status_code == 200


def test_member_of_admins_group_may_act_without_staff():
    """Roles (issue 4): the group "admins" acts through the API like staff does; a
    member of "operators" only reads."""
    from django.contrib.auth.models import Group

    user = get_user_model().objects.create_user("grp-admin")
    user.groups.add(Group.objects.get_or_create(name="admins")[0])
    client = APIClient()
    client.force_authenticate(user)
    make_host()
    r = client.put(f"{API}/config/ha.workers", {"value": "7"}, format="json")
    assert r.status_code == 200, r.content
    assert config.get("ha.workers") == 7
    reader = get_user_model().objects.create_user("grp-op")
    reader.groups.add(Group.objects.get_or_create(name="operators")[0])
    client.force_authenticate(reader)
    assert client.put(f"{API}/config/ha.workers", {"value": "3"},
                      format="json").status_code == 403


# --- hostile input (issue 8 part 4): a clear JSON 4xx, never a 500 -------------


def raw(client: APIClient, method: str, path: str, body: str, **extra):
    """Send ``body`` as JSON text exactly as given (``\\ud800`` escapes stay escapes
    on the wire, as a hostile client would send them)."""
    return getattr(client, method)(API + path, body, content_type="application/json",
                                   **extra)


@pytest.mark.parametrize("offset", ["9223372036854775808", "9223372036854775807",
                                    str(10**30), "-1", "abc", "1e3", "", "5.0",
                                    "1000000000.0"])
@pytest.mark.parametrize("path", ["/vms", "/hosts", "/ha-work"])
def test_list_offset_out_of_range_is_400(api, path, offset):
    """Issue 8: an offset of 2^63 was a 500 (bigint out of range); now a 400 that names
    the limit, for every list."""
    make_host()
    r = api.get(f"{API}{path}?offset={offset}")
    assert r.status_code == 400, r.content
    assert r.json()["error"].startswith("offset:")
    if offset.isdigit():
        assert "9007199254740991" in r.json()["error"]


def test_list_offset_at_its_limit_is_an_empty_page(api):
    make_host()
    r = api.get(f"{API}/hosts?offset=9007199254740991&limit=10000")
    assert r.status_code == 200 and r.json() == []


def test_events_after_beyond_the_id_range_is_400(api):
    assert api.get(f"{API}/events?after=9223372036854775807").json() == []
    r = api.get(f"{API}/events?after=9223372036854775808")
    assert r.status_code == 400 and "after" in r.json()["error"]


@pytest.mark.parametrize(
    "field,value,limit",
    [("cpus", 2**31, "2147483647"), ("cpus", 2**63, "2147483647"),
     ("memory_mb", 2**63, "4398046511104"), ("memory_mb", 2**42 + 1, "4398046511104")],
)
def test_register_vm_too_big_is_400_with_the_limit(api, field, value, limit):
    """Issue 8: cpus ≥ 2^31 or a huge memory_mb was a 500 (integer out of range)."""
    make_host()
    before = state()
    body = {"name": "big", "host": "kvm-01", "cpus": 2, "memory_mb": 1024, field: value}
    r = api.post(f"{API}/vms", body, format="json")
    assert r.status_code == 400, r.content
    assert field in r.json()["error"] and limit in r.json()["error"]
    assert state() == before


def test_register_vm_at_the_limits(api):
    make_host()
    r = api.post(f"{API}/vms", {"name": "big", "host": "kvm-01", "cpus": 2**31 - 1,
                                "memory_mb": 2**42}, format="json")
    assert r.status_code == 201, r.content
    assert api.get(f"{API}/hosts/kvm-01").json()["allocated_memory_mb"] == 2**42


@pytest.mark.parametrize("name", ["a/b", "a b", ".hidden", "-x", "x" * 256, "naïve", "a%2Fb",
                                  "a\nb"])
def test_register_vm_with_an_unsafe_name_is_400_saying_the_rule(api, name):
    """Issue 8 / hadash.names: a VM named `a/b` could never be reached in the API or the
    dashboard; a name outside the safe set is refused with the rule."""
    make_host()
    before = state()
    r = api.post(f"{API}/vms", {"name": name, "host": "kvm-01", "cpus": 1, "memory_mb": 512},
                 format="json")
    assert r.status_code == 400, r.content
    assert r.json()["error"].startswith("name:")
    assert "ASCII letters, digits" in r.json()["error"] or "255" in r.json()["error"]
    assert state() == before


@pytest.mark.parametrize(
    "body",
    ['{"name": "x\\u0000", "host": "kvm-01", "cpus": 1, "memory_mb": 1}',
     '{"name": "x\\ud800", "host": "kvm-01", "cpus": 1, "memory_mb": 1}',
     '{"name": "x", "host": "kvm-01\\u0000", "cpus": 1, "memory_mb": 1}',
     '{"name": "x", "host": "kvm-01", "cpus": 1, "memory_mb": 1, "priority": "\\ud800"}',
     '{"name": "x", "host": "kvm-01", "cpus": 1, "memory_mb": 1, "type": "\\udfff"}'],
)
def test_register_vm_nul_or_surrogate_is_400(api, body):
    """Issue 8: a NUL or a lone surrogate anywhere is a 400 JSON error (the error may
    quote the value: it is written out, never sent raw)."""
    make_host()
    before = state()
    r = raw(api, "post", "/vms", body)
    assert r.status_code == 400, r.content
    assert set(r.json()) <= {"error", "details"}
    r.content.decode("utf-8")  # the answer itself is valid UTF-8
    assert state() == before


@pytest.mark.parametrize(
    "body,needle",
    [('{"tags": ["ssd\\u0000"]}', "NUL"),
     ('{"tags": "ssd,gp\\ud800u"}', "surrogate"),
     ('{"tags": ["a\\u0007b"]}', "control"),
     ('{"oobm_username": "root\\u0000"}', "oobm_username"),
     ('{"oobm_system_id": "\\udc00"}', "oobm_system_id"),
     ('{"\\ud800": 1}', "cannot set"),
     ('{"oobm_enabled": "\\ud800"}', "oobm_enabled")],
)
def test_patch_host_nul_or_surrogate_is_400_and_changes_nothing(api, body, needle):
    """Issue 8: NUL or surrogates in tags (and other host settings) were a 500."""
    make_host(tags="old")
    before = state()
    r = raw(api, "patch", "/hosts/kvm-01", body)
    assert r.status_code == 400, r.content
    assert needle in r.json()["error"]
    assert state() == before


def test_patch_vm_surrogate_is_400(api):
    make_vm("v1", make_host())
    before = state()
    r = raw(api, "patch", "/vms/v1", '{"priority": "hi\\ud800gh"}')
    assert r.status_code == 400 and "priority" in r.json()["error"]
    assert "\\ud800" in r.json()["error"]  # quoted, written out
    assert state() == before


@pytest.mark.parametrize("path", ["/vms/a%00b", "/hosts/a%00b", "/vms/a%00b/stop",
                                  "/hosts/a%00b/enable"])
def test_nul_in_a_path_name_is_404(api, path):
    """A name that cannot be stored names nothing: 404 (it was a 500 on PostgreSQL)."""
    make_host()
    before = state()
    r = api.get(API + path) if path.count("/") == 2 else api.post(API + path)
    assert r.status_code == 404, r.content
    assert "error" in r.json()
    assert state() == before


@pytest.mark.parametrize("path", ["/config/ha.workers", "/config", "/vms", "/vms/v1",
                                  "/hosts/kvm-01/disable", "/events"])
def test_options_answers_json(api, path):
    """Issue 8: OPTIONS on a config key was a 500; OPTIONS says which methods a path
    takes and where the description is."""
    make_vm("v1", make_host())
    r = api.options(API + path)
    assert r.status_code == 200, r.content
    data = r.json()
    assert "OPTIONS" in data["methods"]
    assert data["openapi"].endswith("/api/v1/openapi.json")
    assert api.options(f"{API}/config/ha.workers").json()["methods"] == ["GET", "PUT",
                                                                          "OPTIONS"]
    assert APIClient().options(API + path).status_code == 401


def test_answers_are_json_whatever_the_client_accepts(api):
    """Every answer, errors included, is JSON — also for a browser's Accept header."""
    make_host()
    for path, code in (("/hosts/kvm-01", 200), ("/hosts/nope", 404), ("/vms?limit=0", 400)):
        r = api.get(API + path, HTTP_ACCEPT="text/html")
        assert r.status_code == code
        assert r["Content-Type"].startswith("application/json")
        r.json()
    r = api.get(f"{API}/hosts", HTTP_ACCEPT="FALSE")
    assert r.status_code == 200 and r["Content-Type"].startswith("application/json")


def test_form_bodies_are_415_json(api):
    make_host()
    r = api.patch(f"{API}/hosts/kvm-01", "tags=ssd",
                  content_type="application/x-www-form-urlencoded")
    assert r.status_code == 415 and "error" in r.json()


# --- index, docs, unknown paths (issue 8 part 4) ------------------------------


@pytest.mark.parametrize("method", ["get", "post", "put", "delete", "patch"])
@pytest.mark.parametrize("path", ["/nope", "/vms/a/b", "/hosts/kvm-01/reboot", "/vms/",
                                  "/ha-work/abc", "/v2/hosts"])
def test_unknown_api_path_is_json_404(method, path):
    """Issue 8: an unknown /api/v1/ path answers JSON, not the site's HTML 404 — with
    or without credentials, whatever the method."""
    r = getattr(APIClient(), method)(API + path)
    assert r.status_code == 404
    assert r["Content-Type"] == "application/json"
    assert r.json()["error"].startswith(f"no such API path: {API}{path}")
    assert set(r.json()) == {"error"}


def test_trailing_slash_404_says_what_to_try():
    r = APIClient().get(f"{API}/vms/")
    assert f"try {API}/vms" in r.json()["error"]


def test_index_lists_the_resources():
    """Issue 8: GET /api/v1/ answers an index: the resources, their URLs, the OpenAPI
    document and the docs."""
    r = APIClient().get(f"{API}/")
    assert r.status_code == 200
    data = r.json()
    assert set(data["resources"]) >= {"hosts", "vms", "ha-work", "events", "config",
                                      "engine"}
    assert data["resources"]["vms"]["url"] == "http://testserver/api/v1/vms"
    assert data["openapi"] == "http://testserver/api/v1/openapi.json"
    assert data["docs"] == "http://testserver/api/v1/docs"
    assert "Bearer" in data["authentication"]
    # /api/v1 (no slash) finds the index too
    r = APIClient().get(API, follow=True)
    assert r.status_code == 200 and "resources" in r.json()


def test_docs_page_lists_every_operation():
    r = APIClient().get(f"{API}/docs")
    assert r.status_code == 200 and r["Content-Type"].startswith("text/html")
    page = r.content.decode()
    doc = json.loads(APIClient().get(f"{API}/openapi.json").content)
    for path, item in doc["paths"].items():
        for method in item:
            assert f"{method.upper()} {path}" in page
    assert "<script" not in page


# --- bodies refused by their headers, before they are read (issue 8 part 4) ----


class UnreadableBody:
    """A request body that fails the test if anyone reads it."""

    def read(self, *args):
        raise AssertionError("the request body was read")

    readline = read


def send_unread(client: APIClient, method: str, path: str, length: str, **extra):
    return client.generic(method.upper(), API + path, CONTENT_TYPE="application/json",
                          CONTENT_LENGTH=length, **{"wsgi.input": UnreadableBody()}, **extra)


@pytest.mark.parametrize("method,path", [("post", "/vms"), ("put", "/config/ha.workers"),
                                         ("patch", "/hosts/kvm-01"),
                                         ("post", "/hosts/kvm-01/disable")])
def test_unauthenticated_body_is_401_unread(method, path):
    """Issue 8: a body without credentials is refused (401) without reading it."""
    make_host()
    before = state()
    r = send_unread(APIClient(), method, path, "100")
    assert r.status_code == 401
    assert "credentials" in r.json()["error"]
    assert r["WWW-Authenticate"] == "Bearer"
    assert state() == before


@pytest.mark.parametrize("client_fixture", ["api", None])
def test_oversized_body_is_413_unread(request, client_fixture):
    """Issue 8: a Content-Length above the limit is a 413 before reading, for anyone."""
    make_host()
    client = request.getfixturevalue(client_fixture) if client_fixture else APIClient()
    r = send_unread(client, "patch", "/hosts/kvm-01", str(10**12))
    assert r.status_code == 413
    assert "65536" in r.json()["error"]


def test_wrong_token_with_body_is_401_unread(staff):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Bearer wrong")
    r = send_unread(client, "put", "/config/ha.workers", "20")
    assert r.status_code == 401


def test_read_only_token_with_body_is_403_unread(ro_api):
    make_host()
    r = send_unread(ro_api, "patch", "/hosts/kvm-01", "20")
    assert r.status_code == 403


def test_bad_content_length_is_400(api):
    r = send_unread(api, "put", "/config/ha.workers", "12abc")
    assert r.status_code == 400 and "Content-Length" in r.json()["error"]


def test_body_at_the_limit_is_read(api):
    make_host()
    body = json.dumps({"tags": ["ssd"], "oobm_username": "r" * 200}).ljust(65536)
    r = api.patch(f"{API}/hosts/kvm-01", body, content_type="application/json")
    assert r.status_code == 200, r.content


def test_early_refusal_rules():
    """hadash.api.guard, the header-only rules the HTTP server can apply too."""
    from hadash.api.guard import early_refusal

    auth = [("Authorization", "Bearer x")]
    assert early_refusal("/api/v1/vms", [("Content-Length", "10")])[0] == 401
    assert early_refusal("/api/v1/vms", [("Content-Length", "10"), *auth]) is None
    assert early_refusal("/api/v1/vms", [("content-length", "10"),
                                         ("Cookie", "a=1; sessionid=abc")]) is None
    assert early_refusal("/api/v1/vms", [("Content-Length", "0")]) is None
    assert early_refusal("/api/v1/vms", []) is None
    assert early_refusal("/api/v1/vms", [("Content-Length", "65537"), *auth])[0] == 413
    assert early_refusal("/api/v1/vms", [("Content-Length", "-1"), *auth])[0] == 400
    assert early_refusal("/api/v1/vms", [("Transfer-Encoding", "chunked"), *auth])[0] == 411
    assert early_refusal("/admin/login/", [("Content-Length", "10")]) is None
    # R25: a group of 1,000 member names is a valid body well above 64 KiB.
    group = [("Content-Length", str(1000 * 257 + 20)), *auth]
    assert early_refusal("/api/v1/vm-groups/db", group) is None
    assert early_refusal("/api/v1/vm-groups", group) is None
    assert early_refusal("/api/v1/vm-groupsX", group)[0] == 413


def test_a_value_the_database_refuses_is_a_400_not_a_500():
    """Defence in depth (issue 8): should a value slip past the checks and the
    database refuse it, the client hears 400 with a JSON error, not a 500."""
    from django.db import DataError

    from hadash.api.views import api_exception_handler

    r = api_exception_handler(DataError("integer out of range"), {})
    assert r.status_code == 400 and "cannot be stored" in r.data["error"]


def _through_gate(method: str, path: str, headers: list[tuple[bytes, bytes]],
                  body: bytes = b"", length: int | None = None):
    """One HTTP request through ApiGate(Django's ASGI handler); returns (status, json,
    how many times the body was asked for)."""
    import asyncio

    from asgiref.sync import async_to_sync
    from django.core.asgi import get_asgi_application

    from hadash.api.asgi import ApiGate

    app = ApiGate(get_asgi_application())
    reads, sent = [], []

    async def receive():
        reads.append(1)
        if len(reads) > 1:  # after the body a client only disconnects: not in this test
            await asyncio.sleep(3600)
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    size = len(body) if length is None else length
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "server": ("testserver", 80),
             "client": ("127.0.0.1", 50000),
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                         (b"content-length", str(size).encode()), *headers]}
    async_to_sync(app)(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(data), len(reads)


@pytest.mark.django_db(transaction=True)
def test_asgi_gate_refuses_bodies_before_reading_them():
    """Issue 8: under ASGI (where Django reads the whole body before any view) a body
    without valid credentials is 401 and one over the limit is 413, and the body is
    never asked for; valid credentials go through."""
    from django.test import Client

    staff = get_user_model().objects.create_user("ops", is_staff=True)
    inactive = get_user_model().objects.create_user("gone", is_staff=True, is_active=False)
    _, key = ApiToken.issue(staff)
    _, old_key = ApiToken.issue(inactive)
    browser = Client()
    browser.force_login(staff)
    session = browser.cookies["sessionid"].value
    make_host()
    body = json.dumps({"value": "7"}).encode()
    put = "/api/v1/config/ha.workers"
    for headers, needle in [
        ([], "authentication required"),
        ([(b"authorization", b"Bearer wrong")], "Invalid"),
        ([(b"authorization", f"Bearer {old_key}".encode())], "Invalid"),
        ([(b"authorization", b"Basic eDp5")], "Bearer"),
        ([(b"cookie", b"sessionid=forged")], "session"),
    ]:
        status, data, reads = _through_gate("PUT", put, headers, body)
        assert (status, reads) == (401, 0), (headers, data)
        assert needle in data["error"]
    bearer = [(b"authorization", f"Bearer {key}".encode())]
    status, data, reads = _through_gate("PUT", put, bearer, length=10**9)
    assert (status, reads) == (413, 0) and "65536" in data["error"]
    assert config.get("ha.workers") == 5
    # Good credentials pass; the body is read and the change made.
    status, data, reads = _through_gate("PUT", put, bearer, body)
    assert status == 200 and reads >= 1, data
    assert config.get("ha.workers") == 7
    status, data, _ = _through_gate("PUT", put, [(b"cookie", f"sessionid={session}".encode())],
                                    json.dumps({"value": "6"}).encode())
    assert status == 403 and "CSRF" in data["error"]  # a browser session needs its token
    # Requests without a body and other paths pass through untouched.
    status, data, _ = _through_gate("GET", "/api/v1/hosts", bearer)
    assert status == 200 and data[0]["name"] == "kvm-01"
    status, data, _ = _through_gate("GET", "/api/v1/hosts", [])
    assert status == 401
