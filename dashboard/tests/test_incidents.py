"""Incidents (R18) and alerts (R19) on the dashboard: the incident table and page read
from the ``incident`` / ``incident_vm`` / ``alert`` tables (rows made here directly,
as the engine would leave them), the overview's alerts panel, acknowledging one alert
or all the ones an operator saw, and a bounded number of queries per page."""

from __future__ import annotations

import datetime as dt
import re
from html import unescape
from urllib.parse import quote

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import transaction
from django.test import Client
from django.utils import timezone

from hadash import alerts as hadash_alerts
from hadash.choices import (
    AlertState,
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
from hadash.models import Alert, HaWork, Incident, IncidentVm
from hosts.models import Host
from vms.models import VMInstance

pytestmark = pytest.mark.django_db

User = get_user_model()
T0 = dt.datetime(2026, 11, 30, 10, 0, 0, tzinfo=dt.UTC)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def user_in(group: str, name: str):
    u = User.objects.create_user(name, password="pw-123456")
    u.groups.add(Group.objects.get(name=group))
    return u


@pytest.fixture
def op() -> Client:
    c = Client()
    c.force_login(user_in("operators", "olga"))
    return c


@pytest.fixture
def adm() -> Client:
    c = Client()
    c.force_login(user_in("admins", "adam"))
    return c


def html(response) -> str:
    assert response.status_code == 200, response.status_code
    return response.content.decode()


def host_incident(host: Host, *, state=IncidentState.RESOLVED, detected=10.0, vms=(),
                  started=0.0, declared=None, fenced=None, resolved=None,
                  cluster=None) -> Incident:
    """A host incident as hadash.incidents leaves it; ``vms``: (vm, down_since s,
    running_at s or None, outcome, target host name)."""
    restarts = [r for _, _, r, o, _ in vms if r is not None and o == VmOutcome.RESTARTED]
    inc = Incident.objects.create(
        kind=IncidentKind.HOST, state=state, host=host, host_name=host.name,
        cluster=cluster if cluster is not None else host.cluster,
        title=f"Host {host.name} failed", started_at=at(started), detected_at=at(detected),
        declared_at=at(declared) if declared is not None else None,
        fenced_at=at(fenced) if fenced is not None else None,
        first_restart_at=at(min(restarts)) if restarts else None,
        last_restart_at=at(max(restarts)) if restarts else None,
        resolved_at=at(resolved) if resolved is not None else None,
        vms_affected=sum(1 for v in vms if v[0].ha_enabled),
        vms_restarted=sum(1 for v in vms if v[3] == VmOutcome.RESTARTED),
        vms_failed=sum(1 for v in vms if v[3] == VmOutcome.FAILED),
        updated=at(detected),
    )
    for vm, down, running, outcome, target in vms:
        IncidentVm.objects.create(
            incident=inc, vm=vm, vm_name=vm.name, ha=vm.ha_enabled, outcome=outcome,
            down_since=at(down), running_at=at(running) if running is not None else None,
            target_host_name=target, detail=f"{vm.name}: {outcome}",
        )
    return inc


@pytest.fixture
def story():
    """h1 (c1) failed and was recovered: vm1 down 40 s, vm5 down 20 s (both restarted
    on h2), vm2 not HA. vm3 crashed on h2 and came back after 10 s. h3 (c2) is failing
    now: declared, its vm4 pending. Its alert is open; h1's is resolved; a brake alert
    (not an incident) is open too."""
    h1, h2, h3 = (Host.objects.create(name=n, cluster=c)
                  for n, c in (("h1", "c1"), ("h2", "c1"), ("h3", "c2")))
    vm1 = VMInstance.objects.create(name="vm1", host=h2, ha_enabled=True)
    vm2 = VMInstance.objects.create(name="vm2", last_host=h1, ha_enabled=False)
    vm3 = VMInstance.objects.create(name="vm3", host=h2, ha_enabled=True)
    vm4 = VMInstance.objects.create(name="vm4", last_host=h3, ha_enabled=True)
    vm5 = VMInstance.objects.create(name="vm5", host=h2, ha_enabled=True)
    inc1 = host_incident(h1, detected=12, started=2, declared=30, fenced=35, resolved=60,
                         vms=[(vm1, 2, 42, VmOutcome.RESTARTED, "h2"),
                              (vm5, 2, 22, VmOutcome.RESTARTED, "h2"),
                              (vm2, 2, None, VmOutcome.NOT_HA, "")])
    inc2 = Incident.objects.create(
        kind=IncidentKind.VM, state=IncidentState.RESOLVED, vm=vm3, vm_name="vm3",
        host=h2, host_name="h2", cluster="c1", title="VM vm3 powered off",
        started_at=at(100), detected_at=at(101), first_restart_at=at(110),
        last_restart_at=at(110), resolved_at=at(110), vms_affected=1, vms_restarted=1,
        updated=at(110))
    IncidentVm.objects.create(incident=inc2, vm=vm3, vm_name="vm3", down_since=at(100),
                              running_at=at(110), outcome=VmOutcome.RESTARTED,
                              target_host_name="h2")
    inc3 = host_incident(h3, state=IncidentState.RECOVERING, detected=205, started=200,
                         declared=230, vms=[(vm4, 200, None, VmOutcome.PENDING, "")])
    with transaction.atomic():
        # h1's story: its events and HA items link to it; its alert opened and resolved.
        for t, event, msg in ((12, "PingTimeout", "h1 behind on ping"),
                              (30, "HostDown", "h1 is down"),
                              (35, "HostFenced", "h1 powered off through its BMC")):
            record_event(Subject.HOST, h1, event=event, message=msg, now=at(t), incident=inc1)
        hadash_alerts.open_alert("host-failure", Subject.HOST, "h1", now=at(12),
                                 title="h1 behind on ping: investigating", incident=inc1)
        hadash_alerts.update_incident_alert(inc1, now=at(30), title="h1 declared Down",
                                            severity=Severity.CRITICAL)
        hadash_alerts.resolve_alert(incident=inc1, now=at(60), message="vm1, vm5 restarted")
        record_event(Subject.VM, vm1, event="HaStarted", message="vm1 started on h2",
                     now=at(42), incident=inc1)
        for vm in (vm1, vm5):
            w = HaWork.objects.create(
                instance=vm, vm_type="User", type=WorkType.HA, reason=Reason.HOST_DOWN,
                step=Step.DONE, host=h1, target_host=h2, state="Running", update_count=1,
                time_to_try=at(30), created=at(30), updated=at(42), incident=inc1)
            assert w.pk
        hadash_alerts.open_alert("host-failure", Subject.HOST, "h3", now=at(205),
                                 title="h3 declared Down: 1 HA VM to restart",
                                 severity=Severity.CRITICAL, incident=inc3, cluster="c2")
        hadash_alerts.open_alert("BrakeEngaged", Subject.CLUSTER, "c2", now=at(206),
                                 title="HA brake engaged in c2: 2 of 3 hosts Down",
                                 cluster="c2")
    return {"inc1": inc1, "inc2": inc2, "inc3": inc3}


def rows(page: str) -> list[dict]:
    return [m.groupdict() for m in re.finditer(
        r'<tr id="inc-(?P<id>\d+)" data-incident-id="\d+" data-kind="(?P<kind>\w+)" '
        r'data-subject="(?P<subject>[^"]*)" data-state="(?P<state>\w+)" '
        r'data-cluster="(?P<cluster>[^"]*)" data-detection="(?P<detection>[^"]*)" '
        r'data-downtime-max="(?P<dt_max>[^"]*)"', page)]


# --- the incident table (R18) ----------------------------------------------------------------


def test_r18_incidents_page_lists_incident_rows_newest_first_with_detection_and_downtime(
        op, story):
    page = html(op.get("/incidents"))
    got = rows(page)
    assert [(r["kind"], r["subject"], r["state"]) for r in got] == [
        ("host", "h3", "Recovering"), ("vm", "vm3", "Resolved"), ("host", "h1", "Resolved")]
    h1 = got[2]
    # Detection = detected − started (10 s); downtime per VM is min 20 / median 30 / max 40.
    assert float(h1["detection"]) == 10 and float(h1["dt_max"]) == 40
    row = page[page.index(f'id="inc-{story["inc1"].pk}"'):]
    row = row[:row.index("</tr>")]
    assert "20 s / 30 s / <b>40 s</b>" in row
    assert re.search(r'class="num vms">2 / 2 / 0<', row)  # affected / restarted / failed
    assert "+18 s" in row and "+23 s" in row  # declared and fenced, after detection
    assert f'href="/incidents/{story["inc1"].pk}"' in row and 'href="/hosts/h1"' in row
    assert got[0]["dt_max"] == ""  # nothing back yet
    assert 'id="incident-total" data-total="3"' in page
    assert '<svg class="chart" id="chart-downtime"' in page


def test_r18_incidents_filter_by_state_kind_cluster_and_time(op, story):
    def subjects(query: str) -> list[str]:
        return [r["subject"] for r in rows(html(op.get("/incidents" + query)))]

    assert subjects("?state=open") == ["h3"]
    assert subjects("?state=Resolved") == ["vm3", "h1"]
    assert subjects("?kind=vm") == ["vm3"]
    assert subjects("?kind=host&cluster=c1") == ["h1"]
    assert subjects("?cluster=c2") == ["h3"]
    assert subjects(f"?since={quote(at(100).isoformat())}") == ["h3", "vm3"]
    assert subjects(f"?since={at(100):%Y-%m-%dT%H:%M}&until={at(150):%Y-%m-%dT%H:%M}") \
        == ["vm3"]
    assert subjects("?until=2026-11-30") == []  # a date alone: before that day
    assert subjects("?range=24h") == []  # the story is in the past
    # A bad value is said, and not applied.
    page = unescape(html(op.get("/incidents?state=Sleeping&since=yesterday")))
    assert 'id="filter-errors"' in page and "'Sleeping' is not one of" in page
    assert "since: 'yesterday' is not a date" in page
    assert len(rows(page)) == 3
    assert "No incident matches these filters." in html(op.get("/incidents?cluster=c9"))


def test_r18_incidents_are_paged_newest_first(op):
    h = Host.objects.create(name="kvm-01")
    for i in range(120):
        host_incident(h, state=IncidentState.DISMISSED, detected=i * 60, started=i * 60 - 5)
    first = html(op.get("/incidents"))
    ids = [int(r["id"]) for r in rows(first)]
    assert len(ids) == 50 and ids == sorted(ids, reverse=True)
    assert "page 1 of 3" in first and 'id="page-next"' in first and 'id="page-prev"' not in first
    third = html(op.get("/incidents?page=3&state=Dismissed"))
    assert len(rows(third)) == 20 and 'id="page-next"' not in third
    assert 'href="?state=Dismissed&amp;page=2"' in third
    assert len(rows(html(op.get("/incidents?page=99")))) == 20  # the last page


def test_r18_incident_page_shows_timeline_vms_downtime_work_and_alert(op, story):
    inc = story["inc1"]
    page = html(op.get(f"/incidents/{inc.pk}"))
    assert 'id="incident-state" data-state="Resolved"' in page
    assert "Resolved: 2 of 2 HA VM(s) restarted, longest downtime 40 s." in page
    tl = page[page.index('id="incident-timeline"'):]
    tl = tl[:tl.index("</ol>")]
    assert re.findall(r'data-event="(\w+)"', tl) == [
        "PingTimeout", "AlertOpened", "HostDown", "HostFenced", "HaStarted", "AlertResolved"]
    vms = page[page.index('id="incident-vms"'):]
    vms = vms[:vms.index("</table>")]
    assert re.findall(r'data-vm="(\w+)" data-outcome="([\w-]+)" data-downtime="([^"]*)"',
                      vms) == [("vm1", "restarted", "40.0"), ("vm5", "restarted", "20.0"),
                               ("vm2", "not-ha", "")]
    assert 'href="/hosts/h2"' in vms
    work = page[page.index('id="incident-work"'):]
    assert len(re.findall(r'data-work-id="\d+" data-step="Done"', work)) == 2
    alert = page[page.index('id="incident-alert"'):]
    assert 'data-state="resolved"' in alert and "h1 declared Down" in alert
    assert "detection time 10 s" in page
    assert op.get("/incidents/999999").status_code == 404


def test_r18_r26_an_observed_incident_says_nothing_was_done_and_what_would_have_been(op):
    """R26: in observe mode the items end Done/Observed and the incident resolves with no
    VM restarted. Its page says the VMs were only observed (not "Resolved: 0 of 2
    restarted" alone), and an item's note reads as what would have been done, not as a
    "last error"."""
    h1, h2 = (Host.objects.create(name=n, cluster="c1") for n in ("h1", "h2"))
    vms = [VMInstance.objects.create(name=n, host=h1, ha_enabled=True) for n in ("vo1", "vo2")]
    inc = host_incident(h1, declared=10, resolved=11,
                        vms=[(v, 0, None, VmOutcome.OBSERVED, "") for v in vms])
    for v in vms:
        HaWork.objects.create(
            instance=v, vm_type="User", type=WorkType.HA, reason=Reason.OBSERVED,
            step=Step.DONE, host=h1, state="Running", update_count=1, time_to_try=at(10),
            created=at(10), updated=at(11), incident=inc,
            last_error=f"Observe mode: would restart {v.name} on h2; nothing was sent")
    page = unescape(html(op.get(f"/incidents/{inc.pk}")))
    assert ("Resolved: 0 of 2 HA VM(s) restarted, 2 only observed (observe mode: nothing "
            "was done).") in page
    assert "observed: Observe mode: would restart vo1 on h2; nothing was sent" in page
    assert "last error: Observe mode" not in page


def test_r18_incident_pages_have_a_bounded_number_of_queries(op, django_assert_max_num_queries):
    hosts = [Host.objects.create(name=f"kvm-{i:03d}", cluster=f"c{i % 4}") for i in range(60)]
    vms = [VMInstance.objects.create(name=f"vm-{i:03d}", ha_enabled=True) for i in range(600)]
    incs = [host_incident(h, vms=[(vms[i * 10 + j], 0, 20 + j, VmOutcome.RESTARTED, "x")
                                  for j in range(10)])
            for i, h in enumerate(hosts)]
    with django_assert_max_num_queries(12):
        page = html(op.get("/incidents"))
    assert len(rows(page)) == 50 and page.count("20 s / 24 s / <b>29 s</b>") == 50
    with django_assert_max_num_queries(14):
        page = html(op.get(f"/incidents/{incs[0].pk}"))
    assert page.count('data-outcome="restarted"') == 10


# --- the alerts panel (R19) ------------------------------------------------------------------


def panel(page: str) -> list[tuple[str, str, str]]:
    box = page[page.index('id="alert-list"'):]
    box = box[:box.index("</ul>")]
    return re.findall(r'data-alert-id="(\d+)" data-kind="([^"]+)" data-severity="(\w+)"', box)


def test_r19_overview_lists_open_alerts_and_a_resolved_one_disappears(op, story):
    page = html(op.get("/"))
    shown = panel(page)
    # Open ones only (h1's resolved alert is not there), critical first.
    assert [k for _, k, _ in shown] == ["host-failure", "BrakeEngaged"]
    assert [s for _, _, s in shown] == ["critical", "warning"]
    assert f'href="/incidents/{story["inc3"].pk}"' in page  # the alert leads to its incident
    assert 'id="alerts-open-count" data-n="2"' in page
    assert 'id="alerts-unacked-count" data-n="2"' in page
    data = op.get("/alerts.json").json()
    assert (data["open"], data["unacknowledged"]) == (2, 2)
    assert [a["title"] for a in data["alerts"]] == [
        "h3 declared Down: 1 HA VM to restart", "HA brake engaged in c2: 2 of 3 hosts Down"]
    assert data["alerts"][0]["url"] == f"/incidents/{story['inc3'].pk}"
    # The incident progresses: same alert, updated; then it ends and the alert goes.
    with transaction.atomic():
        hadash_alerts.update_incident_alert(story["inc3"], now=at(240),
                                            title="h3 fenced: restarting 1 HA VM")
    a = op.get("/alerts.json").json()["alerts"][0]
    assert (a["title"], a["count"]) == ("h3 fenced: restarting 1 HA VM", 2)
    with transaction.atomic():
        hadash_alerts.resolve_alert(incident=story["inc3"], now=at(250))
    data = op.get("/alerts.json").json()
    assert [a["kind"] for a in data["alerts"]] == ["BrakeEngaged"] and data["open"] == 1
    assert [k for _, k, _ in panel(html(op.get("/")))] == ["BrakeEngaged"]
    assert op.get("/summary.json").json()["alerts_open"] == 1


def test_r19_admin_acknowledges_one_alert_operator_cannot(op, adm, story):
    brake = Alert.objects.get(kind="BrakeEngaged")
    r = op.post(f"/alerts/{brake.pk}/ack", HTTP_ACCEPT="application/json")
    assert r.status_code == 403 and "admin" in r.json()["error"]
    assert Alert.objects.get(pk=brake.pk).acknowledged_at is None
    assert "ack-btn" not in html(op.get("/")) and "ack-btn" in html(adm.get("/"))
    r = adm.post(f"/alerts/{brake.pk}/ack", HTTP_ACCEPT="application/json")
    assert r.json() == {"ok": True, "id": brake.pk, "acknowledged": 1}
    brake.refresh_from_db()
    assert brake.acknowledged_by == "adam" and brake.state == AlertState.OPEN
    # Still listed while open (after the unacknowledged one), marked acknowledged.
    page = html(adm.get("/"))
    assert [(k, page_ack) for k, page_ack in re.findall(
        r'data-kind="([^"]+)" data-severity="\w+" data-acknowledged="(\d)"', page)] == [
        ("host-failure", "0"), ("BrakeEngaged", "1")]
    assert "acknowledged by adam" in page
    assert 'id="alerts-unacked-count" data-n="1"' in page
    # Without JavaScript: the form posts and comes back with a message.
    inc3_alert = Alert.objects.get(incident=story["inc3"])
    page = html(adm.post(f"/alerts/{inc3_alert.pk}/ack", follow=True))
    assert "Alert acknowledged: h3 declared Down" in page
    assert adm.post("/alerts/999999/ack").status_code == 404
    assert adm.get(f"/alerts/{brake.pk}/ack").status_code == 405


def test_r19_incident_alert_is_acknowledged_from_its_incident_page(adm, op, story):
    inc = story["inc3"]
    alert = Alert.objects.get(incident=inc)
    assert "ack-btn" not in html(op.get(f"/incidents/{inc.pk}"))
    page = html(adm.get(f"/incidents/{inc.pk}"))
    assert f'action="/alerts/{alert.pk}/ack"' in page
    r = adm.post(f"/alerts/{alert.pk}/ack", {"next": f"/incidents/{inc.pk}"})
    assert r.status_code == 302 and r["Location"] == f"/incidents/{inc.pk}"
    page = html(adm.get(f"/incidents/{inc.pk}"))
    assert "acknowledged by adam" in page and "ack-btn" not in page


def test_r19_acknowledge_all_confirms_how_many_and_spares_a_newer_alert(adm, op, story):
    page = html(adm.get("/"))
    form = page[page.index('id="ack-all-form"'):]
    upto = int(re.search(r'name="upto" value="(\d+)"', form).group(1))
    # Without JavaScript the button leads to a confirmation naming how many.
    confirm = html(adm.get(f"/alerts/ack-all?upto={upto}"))
    assert "Acknowledge 2 open alerts?" in confirm and 'id="ack-all-yes"' in confirm
    # A new alert arrives after the operator looked: not acknowledged unseen.
    with transaction.atomic():
        hadash_alerts.open_alert("EngineStalled", Subject.ENGINE, "sweeper",
                                 now=timezone.now(), title="Engine stalled",
                                 severity=Severity.CRITICAL)
    assert op.post("/alerts/ack-all", {"upto": upto}).status_code == 403
    r = adm.post("/alerts/ack-all", {"upto": upto}, HTTP_ACCEPT="application/json")
    assert r.json() == {"ok": True, "acknowledged": 2}
    assert list(Alert.objects.filter(state=AlertState.OPEN, acknowledged_at__isnull=True)
                .values_list("kind", flat=True)) == ["EngineStalled"]
    assert "Acknowledge 1 open alert?" in html(adm.get("/alerts/ack-all"))
    r = adm.post("/alerts/ack-all", {"upto": "all"}, HTTP_ACCEPT="application/json")
    assert r.status_code == 400 and "upto" in r.json()["error"]
    assert Alert.objects.filter(acknowledged_at__isnull=True, state="open").count() == 1
    page = html(adm.post("/alerts/ack-all", {"upto": 2**62}, follow=True))
    assert "1 alert(s) acknowledged." in page
    assert 'id="ack-all-form" hidden' in page or 'id="ack-all-form"' in page


def test_r19_pages_with_no_incident_and_no_alert(op):
    page = html(op.get("/"))
    assert 'id="no-alerts"' in page and panel(page) == []
    assert "No incidents: no host fell behind on ping" in html(op.get("/incidents"))
    assert op.get("/alerts.json").json() == {"open": 0, "unacknowledged": 0, "top": 0,
                                             "shown": 50, "alerts": []}
    for path in ("/incidents", "/incidents/1", "/alerts.json", "/alerts/ack-all"):
        assert Client().get(path).status_code == 302  # login first


def test_r19_alert_script_is_served_and_loaded_where_needed(op, story):
    r = op.get("/static/dashboard/alerts.js")
    assert r.status_code == 200 and b"/alerts/ack-all" in b"".join(r.streaming_content)
    assert "dashboard/alerts.js" in html(op.get("/"))
    page = html(op.get(f"/incidents/{story['inc1'].pk}"))
    assert "dashboard/alerts.js" in page and 'data-page="incident"' in page


# --- through the real engine -------------------------------------------------------------------


def test_r18_r19_a_host_failure_through_the_engine_is_one_incident_with_vm_downtime(op):
    """h1 powers off at t=5: the engine opens one incident, declares it, restarts vm1
    (HA) elsewhere and leaves vm2 (not HA) Stopped; the incident page shows vm1's
    downtime (last confirmation → Running again) and the alert resolved by itself. vm3
    crashes at t=120: a VM incident of its own."""
    from fleet.testing import world

    w = world({"hosts": {"h1": {}, "h2": {}, "h3": {"cluster": "c2"}},
               "vms": {"vm1": {"host": "h1", "ha": True}, "vm2": {"host": "h1"},
                       "vm3": {"host": "h2", "ha": True}}})
    w.advance_to(5)
    w.fleet.power_off("h1")
    w.advance_to(120)
    w.fleet.vm_crash("vm3")
    w.advance_to(200)
    inc = Incident.objects.get(kind="host")
    got = rows(html(op.get("/incidents")))
    assert [(r["kind"], r["subject"], r["state"]) for r in got] == [
        ("vm", "vm3", "Resolved"), ("host", "h1", "Resolved")]
    vm1 = IncidentVm.objects.get(incident=inc, vm_name="vm1")
    assert vm1.downtime and vm1.downtime > 0
    assert float(got[1]["dt_max"]) == vm1.downtime
    assert float(got[0]["dt_max"]) > 0  # vm3: its crash to Running again
    page = html(op.get(f"/incidents/{inc.pk}"))
    assert re.search(r'data-vm="vm1" data-outcome="restarted" data-downtime="([\d.]+)"', page)
    assert 'data-vm="vm2" data-outcome="not-ha"' in page
    assert 'data-event="HostDown"' in page and 'data-event="HaStarted"' in page
    alert = page[page.index('id="incident-alert"'):]
    assert 'data-state="resolved"' in alert
    # One alert for the whole story, and it is gone from the overview.
    assert Alert.objects.filter(incident=inc).count() == 1
    assert Alert.objects.filter(incident__isnull=False).count() == 2
    assert op.get("/alerts.json").json()["open"] == 0
    assert 'id="no-alerts"' in html(op.get("/"))
