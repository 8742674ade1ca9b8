"""Operator API for incidents (R18) and alerts (R19): GET /api/v1/incidents (filters,
newest first, per-VM downtime), GET /api/v1/incidents/{id} (VMs, timeline, HA items,
alert), GET /api/v1/alerts, POST /api/v1/alerts/{id}/acknowledge (admins; a read-only
token is a 403 and changes nothing), the deprecated events/{id}/acknowledge, and the
OpenAPI document describing them."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from django.contrib.auth import get_user_model
from django.db import transaction
from rest_framework.test import APIClient

from hadash import alerts as hadash_alerts
from hadash.choices import (
    IncidentKind,
    IncidentState,
    Reason,
    Severity,
    Step,
    Subject,
    VmOutcome,
    WorkType,
)
from hadash.events import record_event
from hadash.models import Alert, Event, HaWork, Incident, IncidentVm
from hosts.models import Host
from vms.models import VMInstance

pytestmark = pytest.mark.django_db

API = "/api/v1"
T0 = dt.datetime(2026, 11, 30, 10, 0, 0, tzinfo=dt.UTC)


def at(s: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=s)


@pytest.fixture
def story():
    """kvm-01 (c1) failed: web-1 back after 30 s on kvm-02, db-1 after 50 s; its alert
    resolved. web-2 crashed on kvm-02 (c1), still down: its alert open. kvm-03 (c2)
    came back before anything was done (Dismissed). A brake alert is open too."""
    h1, h2, h3 = (Host.objects.create(name=n, cluster=c)
                  for n, c in (("kvm-01", "c1"), ("kvm-02", "c1"), ("kvm-03", "c2")))
    web = VMInstance.objects.create(name="web-1", host=h2, ha_enabled=True)
    db = VMInstance.objects.create(name="db-1", host=h2, ha_enabled=True)
    web2 = VMInstance.objects.create(name="web-2", last_host=h2, ha_enabled=True)
    host_inc = Incident.objects.create(
        kind=IncidentKind.HOST, state=IncidentState.RESOLVED, host=h1, host_name="kvm-01",
        cluster="c1", title="kvm-01 failed: 2 HA VMs restarted", started_at=at(0),
        detected_at=at(8), declared_at=at(20), fenced_at=at(24), first_restart_at=at(30),
        last_restart_at=at(50), resolved_at=at(50), vms_affected=2, vms_restarted=2,
        updated=at(50))
    for vm, up in ((web, 30), (db, 50)):
        IncidentVm.objects.create(incident=host_inc, vm=vm, vm_name=vm.name,
                                  outcome=VmOutcome.RESTARTED, down_since=at(0),
                                  running_at=at(up), target_host_name="kvm-02")
        HaWork.objects.create(instance=vm, vm_type="User", type=WorkType.HA,
                              reason=Reason.HOST_DOWN, step=Step.DONE, host=h1,
                              target_host=h2, state="Running", update_count=1,
                              time_to_try=at(20), created=at(20), updated=at(up),
                              incident=host_inc)
    vm_inc = Incident.objects.create(
        kind=IncidentKind.VM, state=IncidentState.RECOVERING, vm=web2, vm_name="web-2",
        host=h2, host_name="kvm-02", cluster="c1", title="web-2 powered off",
        started_at=at(100), detected_at=at(101), vms_affected=1, updated=at(101))
    IncidentVm.objects.create(incident=vm_inc, vm=web2, vm_name="web-2", down_since=at(100))
    dismissed = Incident.objects.create(
        kind=IncidentKind.HOST, state=IncidentState.DISMISSED, host=h3, host_name="kvm-03",
        cluster="c2", title="kvm-03 behind on ping", started_at=at(200),
        detected_at=at(204), resolved_at=at(210), updated=at(210))
    with transaction.atomic():
        record_event(Subject.HOST, h1, event="PingTimeout", now=at(8), incident=host_inc,
                     message="kvm-01 behind on ping")
        record_event(Subject.HOST, h1, event="HostDown", now=at(20), incident=host_inc,
                     message="kvm-01 is Down")
        hadash_alerts.open_alert("host-failure", Subject.HOST, "kvm-01", now=at(8),
                                 title="kvm-01 behind on ping", incident=host_inc)
        hadash_alerts.resolve_alert(incident=host_inc, now=at(50))
        hadash_alerts.open_alert("vm-failure", Subject.VM, "web-2", now=at(101),
                                 title="web-2 powered off: restarting",
                                 severity=Severity.CRITICAL, incident=vm_inc)
        hadash_alerts.open_alert("BrakeEngaged", Subject.CLUSTER, "c2", now=at(150),
                                 title="HA brake engaged in c2")
    return {"host": host_inc, "vm": vm_inc, "dismissed": dismissed}


def test_r18_list_incidents_newest_first_with_downtime_and_detection(api, story):
    r = api.get(f"{API}/incidents")
    assert r.status_code == 200
    rows = r.json()
    assert [i["id"] for i in rows] == [story["dismissed"].pk, story["vm"].pk,
                                       story["host"].pk]
    host = rows[2]
    assert (host["kind"], host["state"], host["host"], host["cluster"]) == (
        "host", "Resolved", "kvm-01", "c1")
    assert host["detection_seconds"] == 8
    assert host["downtime"] == {"min": 30.0, "median": 40.0, "max": 50.0, "count": 2}
    assert (host["vms_affected"], host["vms_restarted"], host["vms_failed"]) == (2, 2, 0)
    assert host["alert"] == Alert.objects.get(incident=story["host"]).pk
    assert rows[1]["downtime"] == {"min": None, "median": None, "max": None, "count": 0}
    assert rows[1]["vm"] == "web-2"


def test_r18_incident_filters(api, story):
    def ids(query: str) -> list[int]:
        r = api.get(f"{API}/incidents{query}")
        assert r.status_code == 200, r.json()
        return [i["id"] for i in r.json()]

    assert ids("?state=open") == [story["vm"].pk]
    assert ids("?state=Dismissed") == [story["dismissed"].pk]
    assert ids("?kind=vm") == [story["vm"].pk]
    assert ids("?cluster=c2") == [story["dismissed"].pk]
    assert ids("?since=2026-11-30T10:01:00Z&until=2026-11-30T10:03:00Z") == [story["vm"].pk]
    assert ids("?limit=1&offset=1") == [story["vm"].pk]
    r = api.get(f"{API}/incidents?limit=1&offset=1")  # paged like every list
    assert r["X-Total-Count"] == "3" and 'rel="next"' in r["Link"] and 'rel="prev"' in r["Link"]
    # Bad input: a clear JSON error.
    for query, word in (("?state=Sleeping", "state"), ("?kind=rack", "kind"),
                        ("?since=yesterday", "since"), ("?limit=0", "limit")):
        r = api.get(f"{API}/incidents{query}")
        assert r.status_code == 400 and word in r.json()["error"], query


def test_r18_incident_detail_has_vms_timeline_work_and_alert(ro_api, story):
    inc = story["host"]
    r = ro_api.get(f"{API}/incidents/{inc.pk}")
    assert r.status_code == 200
    d = r.json()
    assert [(v["vm"], v["outcome"], v["downtime_seconds"], v["target_host"])
            for v in d["vms"]] == [("web-1", "restarted", 30.0, "kvm-02"),
                                   ("db-1", "restarted", 50.0, "kvm-02")]
    assert [e["event"] for e in d["timeline"]] == [
        "PingTimeout", "AlertOpened", "HostDown", "AlertResolved"]
    assert [(w["vm"], w["step"], w["target_host"]) for w in d["ha_work"]] == [
        ("web-1", "Done", "kvm-02"), ("db-1", "Done", "kvm-02")]
    assert d["alert_detail"]["state"] == "resolved" and d["alert"] == d["alert_detail"]["id"]
    assert d["fenced_at"] == "2026-11-30T10:00:24Z"
    r = ro_api.get(f"{API}/incidents/{story['dismissed'].pk}")
    assert r.json()["alert_detail"] is None and r.json()["vms"] == []
    r = ro_api.get(f"{API}/incidents/999999")
    assert r.status_code == 404 and r.json() == {"error": "no incident 999999"}


def test_r19_list_alerts_open_ones_and_unacknowledged(api, story):
    rows = api.get(f"{API}/alerts").json()
    assert [a["kind"] for a in rows] == ["BrakeEngaged", "vm-failure", "host-failure"]
    open_ = api.get(f"{API}/alerts?state=open").json()
    assert [(a["kind"], a["severity"], a["incident"]) for a in open_] == [
        ("BrakeEngaged", "warning", None), ("vm-failure", "critical", story["vm"].pk)]
    assert [a["kind"] for a in api.get(f"{API}/alerts?severity=critical").json()] == [
        "vm-failure"]
    assert [a["kind"] for a in
            api.get(f"{API}/alerts?incident={story['host'].pk}").json()] == ["host-failure"]
    assert api.get(f"{API}/alerts?state=closed").status_code == 400
    one = open_[1]
    assert api.get(f"{API}/alerts/{one['id']}").json() == one


def test_r19_acknowledge_an_alert_needs_an_admin(api, ro_api, story):
    alert = Alert.objects.get(kind="vm-failure")
    r = ro_api.post(f"{API}/alerts/{alert.pk}/acknowledge")
    assert r.status_code == 403 and "admin" in r.json()["error"]
    assert Alert.objects.get(pk=alert.pk).acknowledged_at is None
    r = api.post(f"{API}/alerts/{alert.pk}/acknowledge")
    assert r.status_code == 200
    body = r.json()
    assert body["acknowledged_by"] == "ops" and body["state"] == "open"
    first = body["acknowledged_at"]
    # Again: nothing changes.
    assert api.post(f"{API}/alerts/{alert.pk}/acknowledge").json()["acknowledged_at"] == first
    assert [a["kind"] for a in api.get(f"{API}/alerts?state=open&acknowledged=false")
            .json()] == ["BrakeEngaged"]
    assert api.post(f"{API}/alerts/999999/acknowledge").status_code == 404


def test_r19_old_event_acknowledge_acknowledges_the_alert_it_belongs_to(api, story):
    """Kept for one release: POST /events/{id}/acknowledge on an event of an incident
    (or the AlertOpened event of another alert) acknowledges that alert."""
    down = Event.objects.get(event="HostDown")
    r = api.post(f"{API}/events/{down.pk}/acknowledge")
    assert r.status_code == 200 and r.json()["acknowledged_by"] == "ops"
    assert Alert.objects.get(incident=story["host"]).acknowledged_by == "ops"
    opened = Event.objects.get(event="AlertOpened", new="BrakeEngaged")
    assert api.post(f"{API}/events/{opened.pk}/acknowledge").status_code == 200
    assert Alert.objects.get(kind="BrakeEngaged").acknowledged_by == "ops"
    with transaction.atomic():
        lone = record_event(Subject.HOST, None, name="kvm-09", event="Ping", now=at(300))
    r = api.post(f"{API}/events/{lone.pk}/acknowledge")
    assert r.status_code == 400 and "belongs to no alert" in r.json()["error"]


def test_r18_r19_openapi_describes_incidents_and_alerts():
    doc = json.loads(APIClient().get(f"{API}/openapi.json").content)
    paths = doc["paths"]
    assert {"get"} <= set(paths["/api/v1/incidents"])
    assert {"get"} <= set(paths["/api/v1/incidents/{id}"])
    assert {"get"} <= set(paths["/api/v1/alerts"])
    assert {"post"} <= set(paths["/api/v1/alerts/{id}/acknowledge"])
    params = {p["name"] for p in paths["/api/v1/incidents"]["get"]["parameters"]}
    assert {"state", "kind", "cluster", "since", "until", "limit", "offset"} <= params
    detail = doc["components"]["schemas"]["IncidentDetail"]["properties"]
    assert {"vms", "timeline", "ha_work", "downtime", "alert_detail"} <= set(detail)
    assert "incidents" in APIClient().get(f"{API}/").json()["resources"]


def test_r18_incident_list_needs_credentials():
    assert APIClient().get(f"{API}/incidents").status_code == 401
    assert APIClient().post(f"{API}/alerts/1/acknowledge").status_code == 401


# --- Django admin ---------------------------------------------------------------------------


@pytest.fixture
def admin_site():
    from django.test import Client

    c = Client()
    c.force_login(get_user_model().objects.create_superuser("root", "r@example.com", "pw"))
    return c


def test_r18_r19_admin_lists_incidents_and_alerts_read_only(admin_site, story):
    from django.urls import reverse

    page = admin_site.get(reverse("admin:hadash_incident_changelist") + "?state__exact=Resolved")
    assert page.status_code == 200
    html = page.content.decode()
    assert "kvm-01" in html and "web-2" not in html
    assert f'href="/incidents/{story["host"].pk}"' in html
    r = admin_site.get(reverse("admin:hadash_incident_change", args=[story["host"].pk]))
    assert r.status_code == 200 and b'name="_save"' not in r.content
    assert b"db-1" in r.content and b"50.0" in r.content  # its VMs with downtime
    r = admin_site.post(reverse("admin:hadash_incident_change", args=[story["host"].pk]),
                        {"state": "Open"})
    assert r.status_code == 403
    assert Incident.objects.get(pk=story["host"].pk).state == IncidentState.RESOLVED
    r = admin_site.get(reverse("admin:hadash_alert_changelist") + "?state__exact=open"
                       "&acknowledged=no")
    assert r.status_code == 200
    assert b"HA brake engaged in c2" in r.content and b"kvm-01 behind on ping" not in r.content
    for model in ("hadash_incident", "hadash_alert"):  # issue 8: NUL finds nothing
        assert admin_site.get(reverse(f"admin:{model}_changelist"),
                              {"q": "a\x00b"}).status_code == 200


def test_r19_admin_acknowledge_action(admin_site, story):
    from django.urls import reverse

    brake = Alert.objects.get(kind="BrakeEngaged")
    r = admin_site.post(reverse("admin:hadash_alert_changelist"),
                        {"action": "acknowledge", "_selected_action": [brake.pk]})
    assert r.status_code == 302
    brake.refresh_from_db()
    assert brake.acknowledged_by == "root"
    assert Alert.objects.get(kind="vm-failure").acknowledged_at is None
    # Acknowledging an incident's event in the events admin acknowledges its alert.
    down = Event.objects.get(event="HostDown")
    admin_site.post(reverse("admin:hadash_event_changelist"),
                    {"action": "acknowledge", "_selected_action": [down.pk]})
    assert Alert.objects.get(incident=story["host"]).acknowledged_by == "root"
