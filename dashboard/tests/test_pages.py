"""The operator dashboard (issue 4, items 2 and 3): every page behind a login, read-only
operators vs admins enforced server-side, page content for a small simulated world
(the real engine on virtual time, fleet.testing.world), a bounded number of queries
for the overview of a big fleet, and the simulator proxy."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.test import Client
from django.utils import timezone

from dashboard import views
from dashboard.perms import is_admin
from fleet.testing import world
from hadash import config
from hadash.choices import Reason, Step, Subject, WorkType
from hadash.events import record_event
from hadash.models import Alert, Event, HaWork
from hadash.supervisor import free_port
from hosts.choices import HostStatus, ResourceState
from hosts.models import Host
from vms.choices import PowerState, VmState
from vms.models import VMInstance

pytestmark = pytest.mark.django_db

User = get_user_model()

SMALL = {
    "hosts": {"h1": {}, "h2": {}, "h3": {"cluster": "c2"}},
    "vms": {
        "vm1": {"host": "h1", "ha": True},
        "vm2": {"host": "h1"},
        "vm3": {"host": "h2", "ha": True},
        "vm4": {"host": "h3", "ha": True},
    },
}


# --- fixtures -------------------------------------------------------------------------


def user_in(group: str | None, name: str, **extra):
    u = User.objects.create_user(name, password="pw-123456", **extra)
    if group:
        u.groups.add(Group.objects.get(name=group))
    return u


@pytest.fixture
def operator():
    return user_in("operators", "olga")


@pytest.fixture
def admin():
    return user_in("admins", "adam")


@pytest.fixture
def op(operator) -> Client:
    c = Client()
    c.force_login(operator)
    return c


@pytest.fixture
def adm(admin) -> Client:
    c = Client()
    c.force_login(admin)
    return c


@pytest.fixture
def incident_world():
    """h1 powers off at t=5 and goes Down; vm1 (HA) restarts elsewhere, vm2 (not HA)
    stays Stopped; at t=130 vm3 crashes and is restarted."""
    w = world(SMALL)
    w.advance_to(5)
    w.fleet.power_off("h1")
    w.advance_to(120)
    w.fleet.vm_crash("vm3")
    w.advance_to(200)
    return w


def html(response) -> str:
    assert response.status_code == 200, response.status_code
    return response.content.decode()


PAGES = ["/", "/summary.json", "/hosts/h1", "/vms/vm1", "/work", "/work?step=Done&type=HA",
         "/incidents", "/config"]


# --- login and roles --------------------------------------------------------------------


def test_groups_are_created_by_the_migration():
    assert set(Group.objects.values_list("name", flat=True)) >= {"operators", "admins"}


@pytest.mark.parametrize("path", PAGES + ["/fleet", "/fleet/hosts.json"])
def test_anonymous_is_sent_to_login(client, path):
    r = client.get(path)
    assert r.status_code == 302
    assert r["Location"].startswith("/login/?next=")


def test_every_page_answers_an_operator(op, incident_world, settings):
    settings.HADASH_FLEET_URL = f"http://127.0.0.1:{free_port()}"
    for path in PAGES + ["/fleet"]:
        r = op.get(path)
        assert r.status_code == 200, path
    # Unknown names are 404, not errors.
    assert op.get("/hosts/nope").status_code == 404
    assert op.get("/vms/nope").status_code == 404


def test_login_page_logs_in_and_logout_logs_out(operator):
    c = Client()
    page = html(c.get("/login/"))
    assert 'id="login-form"' in page
    r = c.post("/login/", {"username": "olga", "password": "pw-123456", "next": "/work"})
    assert r.status_code == 302 and r["Location"] == "/work"
    assert c.get("/work").status_code == 200
    assert 'id="login-error"' in html(Client().post("/login/", {"username": "olga",
                                                                "password": "wrong"}))
    r = c.post("/logout/")
    assert r.status_code == 302
    assert c.get("/").status_code == 302


def test_who_is_an_admin(operator, admin):
    staff = User.objects.create_user("stef", is_staff=True)
    root = User.objects.create_superuser("root", password="x")
    plain = User.objects.create_user("nobody")
    assert [is_admin(u) for u in (operator, plain, admin, staff, root)] == \
        [False, False, True, True, True]


def test_buttons_are_hidden_from_operators_and_shown_to_admins(op, adm, incident_world):
    for c, shown in ((op, False), (adm, True)):
        host = html(c.get("/hosts/h2"))
        assert ('id="host-action-disable"' in host) is shown
        assert ('id="host-action-maintenance"' in host) is shown
        vm = html(c.get("/vms/vm3"))
        assert ('id="vm-action-stop"' in vm) is shown
        overview = html(c.get("/"))
        assert ('id="ack-all-form"' in overview) is shown  # R19 (dashboard.alerts)
        assert (f'data-admin="{int(shown)}"' in overview)


def admin_posts(alert_id: int) -> list[str]:
    return ["/hosts/h2/disable", "/hosts/h2/maintenance", "/hosts/h2/cancel-maintenance",
            "/hosts/h2/enable", "/vms/vm3/stop", "/vms/vm2/start", f"/alerts/{alert_id}/ack",
            "/alerts/ack-all", "/fleet/fault"]


def open_alert() -> Alert:
    """An open alert of the alert table (R19), as hadash.alerts raises it."""
    from django.db import transaction

    from hadash import alerts

    with transaction.atomic():
        alert, _ = alerts.open_alert("BrakeEngaged", Subject.CLUSTER, "c1",
                                     now=timezone.now(), title="HA brake engaged in c1")
    return alert


def test_admin_posts_are_403_for_operators(incident_world, operator, settings):
    settings.HADASH_FLEET_URL = f"http://127.0.0.1:{free_port()}"
    c = Client(enforce_csrf_checks=False)
    c.force_login(operator)
    alert = open_alert()
    before = Event.objects.count()
    for path in admin_posts(alert.pk):
        r = c.post(path, {"do": "host h2 power off"})
        assert r.status_code == 403, path
        r = c.post(path, {"do": "host h2 power off"}, HTTP_ACCEPT="application/json")
        assert r.status_code == 403 and "admin" in r.json()["error"], path
    assert Event.objects.count() == before
    assert Host.objects.get(name="h2").resource_state == ResourceState.ENABLED
    assert Alert.objects.get(pk=alert.pk).acknowledged_at is None


def test_admin_posts_need_a_login_and_post(client, incident_world):
    assert client.post("/hosts/h2/disable")["Location"].startswith("/login/")
    c = Client()
    c.force_login(user_in("admins", "anna"))
    assert c.get("/hosts/h2/disable").status_code == 405


def test_csrf_is_enforced(admin, incident_world):
    c = Client(enforce_csrf_checks=True)
    c.force_login(admin)
    assert c.post("/hosts/h2/disable").status_code == 403
    page = html(c.get("/hosts/h2"))
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    assert c.post("/hosts/h2/disable", {"csrfmiddlewaretoken": token}).status_code == 302
    assert Host.objects.get(name="h2").resource_state == ResourceState.DISABLED


# --- admin actions ------------------------------------------------------------------------


def test_admin_host_actions(adm, incident_world):
    r = adm.post("/hosts/h2/disable")
    assert r.status_code == 302 and r["Location"] == "/hosts/h2"
    assert Host.objects.get(name="h2").resource_state == ResourceState.DISABLED
    ev = Event.objects.filter(subject=Subject.HOST, subject_name="h2",
                              event="ResourceStateChanged").last()
    assert ev.new == ResourceState.DISABLED and ev.reason == "adam"
    adm.post("/hosts/h2/enable")
    assert Host.objects.get(name="h2").resource_state == ResourceState.ENABLED
    adm.post("/hosts/h3/maintenance", {"confirm": "yes"})
    assert Host.objects.get(name="h3").resource_state in (
        ResourceState.PREPARE_FOR_MAINTENANCE, ResourceState.MAINTENANCE)
    adm.post("/hosts/h3/cancel-maintenance")
    assert Host.objects.get(name="h3").resource_state == ResourceState.ENABLED
    # A refused action is shown as a message, nothing changes.
    page = html(adm.post("/hosts/h3/cancel-maintenance", follow=True))
    assert "is not in maintenance" in page
    assert adm.post("/hosts/h3/reboot").status_code == 404


def test_admin_vm_stop_and_start(adm, incident_world, monkeypatch):
    r = adm.post("/vms/vm4/stop")
    assert r.status_code == 302
    item = HaWork.objects.get(instance__name="vm4", type=WorkType.STOP)
    assert item.reason == Reason.OPERATOR
    # vm2 stayed Stopped after its host died (not HA): start it with the world's engine.
    monkeypatch.setattr(views, "production_engine", lambda: incident_world.engine)
    assert VMInstance.objects.get(name="vm2").state == VmState.STOPPED
    page = html(adm.post("/vms/vm2/start", follow=True))
    vm2 = VMInstance.objects.get(name="vm2")
    assert vm2.state == VmState.RUNNING and vm2.host.name in ("h2", "h3")
    assert "started on" in page
    # Starting a running VM is refused with a message.
    page = html(adm.post("/vms/vm2/start", follow=True))
    assert "not Stopped" in page


# Acknowledging alerts (R19): dashboard/tests/test_incidents.py.


# --- page content ----------------------------------------------------------------------------


def test_overview_shows_counts_map_alerts_feed_and_engine(op, incident_world):
    page = html(op.get("/"))
    assert re.search(r'data-count="host:Down"><b class="n">1</b>', page)
    assert re.search(r'data-count="host:Up"><b class="n">2</b>', page)
    assert re.search(r'data-count="vm:Running"><b class="n">3</b>', page)
    assert re.search(r'data-count="vm:Stopped"><b class="n">1</b>', page)
    assert 'id="host-total">3<' in page
    # Fleet map: a tile per host, by cluster, coloured by status, labelled by VM count.
    tiles = re.findall(r'<a class="tile ([^"]+)" href="([^"]+)" data-host="([^"]+)" '
                       r'data-host-id="\d+" data-status="([^"]+)" data-rs="(\w+)" '
                       r'data-vms="(\d+)"', page)
    by_name = {t[2]: t for t in tiles}
    assert set(by_name) == {"h1", "h2", "h3"}
    assert by_name["h1"][3] == "Down" and by_name["h1"][5] == "0"
    assert by_name["h2"][3] == "Up" and by_name["h2"][5] == "2"  # vm3 + vm1 restarted
    assert "st-Down" in by_name["h1"][0] and by_name["h1"][1] == "/hosts/h1"
    assert page.index('data-cluster="c1"') < page.index('data-host="h1"') \
        < page.index('data-cluster="c2"') < page.index('data-host="h3"')
    # Open alerts (the alert table, R19); the live feed; the engine (not running here:
    # stalled).
    assert 'id="alert-list"' in page
    assert re.search(r'id="alerts-open-count" data-n="(\d+)"', page).group(1) == str(
        Alert.objects.filter(state="open").count())
    feed = page[page.index('id="event-feed"'):]
    ids = [int(i) for i in re.findall(r'data-event-id="(\d+)"', feed)]
    assert ids == sorted(ids, reverse=True) and ids[0] == Event.objects.latest("id").pk
    assert 'data-healthy="false"' in page and 'id="engine-alert"' in page
    assert 'id="engine-alert" class="banner banner-critical" role="alert" >' in page
    assert 'id="conn-status"' in page and "dashboard/live.js" in page
    top = Event.objects.latest("id").pk
    assert f'data-live-after="{max(0, top - views.LIVE_MARGIN)}"' in page


def test_summary_json(op, incident_world):
    # On time by the wall clock summary.json reads (the world's clock is virtual).
    Host.objects.filter(status="Up").update(last_ping=timezone.now())
    s = op.get("/summary.json").json()
    assert s["host_counts"] == {"Up": 2, "Down": 1}
    assert s["vm_counts"] == {"Running": 3, "Stopped": 1}
    assert s["work_in_flight"] == 0
    rows = {h[1]: h for h in s["hosts"]}
    assert rows["h1"][2:] == ["c1", "Down", "Enabled", 0, False]
    assert rows["h3"][2:] == ["c2", "Up", "Enabled", 1, False]
    assert s["engine"]["healthy"] is False
    assert s["alerts_open"] == len(s["open_alert_ids"])
    assert s["top_event"] == Event.objects.latest("id").pk


def test_summary_json_leaves_out_the_host_rows_the_page_has(op, incident_world):
    """Issue 12: a page refetching summary.json while events arrive sends the
    hosts_version of the rows it painted; unchanged, the rows are left out (the counts
    are not); a host that changes brings every row back."""
    Host.objects.filter(status="Up").update(last_ping=timezone.now())
    first = op.get("/summary.json").json()
    assert len(first["hosts"]) == first["host_total"] == 3
    again = op.get(f"/summary.json?hosts={first['hosts_version']}").json()
    assert again["hosts"] is None and again["host_total"] == 3
    assert again["hosts_version"] == first["hosts_version"]
    assert again["host_counts"] == first["host_counts"]
    assert again["vm_counts"] == first["vm_counts"]
    Host.objects.filter(name="h3").update(resource_state="Disabled")
    changed = op.get(f"/summary.json?hosts={first['hosts_version']}").json()
    assert changed["hosts_version"] != first["hosts_version"]
    assert {h[1]: h[4] for h in changed["hosts"]}["h3"] == "Disabled"
    assert op.get("/summary.json?hosts=bogus").json()["hosts"] is not None


def test_r17_fleet_map_shows_a_suspect_host_before_its_verdict(op, incident_world):
    """R17: a host Up but behind on ping (no verdict yet) is visibly different on the
    overview's map — a `suspect` tile whose accessible name says so — and flagged in
    summary.json for the live update; on time again, it is a plain Up tile."""
    import datetime as dt

    Host.objects.filter(status="Up").update(last_ping=timezone.now())
    Host.objects.filter(name="h3").update(
        last_ping=timezone.now() - dt.timedelta(seconds=600))
    page = html(op.get("/"))
    tile = re.search(r'<a class="tile ([^"]+)"[^>]*data-host="h3"[^>]*>', page).group(0)
    assert "suspect" in tile.split('"')[1]
    assert 'aria-label="h3: Up, suspect: behind on ping, 1 VMs"' in tile
    rows = {h[1]: h for h in op.get("/summary.json").json()["hosts"]}
    assert rows["h3"][6] is True and rows["h2"][6] is False
    Host.objects.filter(name="h3").update(last_ping=timezone.now())
    rows = {h[1]: h for h in op.get("/summary.json").json()["hosts"]}
    assert rows["h3"][6] is False
    tile = re.search(r'<a class="tile ([^"]+)"[^>]*data-host="h3"[^>]*>',
                     html(op.get("/")))
    assert "suspect" not in tile.group(1) and "suspect" not in tile.group(0).split("aria")[1]


def test_host_page(op, incident_world):
    page = html(op.get("/hosts/h1"))
    assert 'id="host-status" data-status="Down"' in page
    inv = page[page.index('id="investigation-list"'):page.index('id="host-work"')]
    assert 'data-event="HostDown"' in inv and 'data-event="HaScheduled"' in inv
    work = page[page.index('id="host-work-table"'):]
    assert re.search(r'data-work-id="\d+" data-step="Done" data-type="HA"', work)
    assert "vm1" in work and "vm2" in work
    assert 'id="host-ping"' in page
    h2 = html(op.get("/hosts/h2"))
    assert 'data-vm="vm1" data-state="Running"' in h2  # restarted here
    assert 'data-vm="vm3"' in h2
    assert 'data-event="PowerStateChanged"' in h2  # vm3's crash, reported by h2


def test_vm_page_shows_every_ha_item_step_by_step(op, incident_world):
    page = html(op.get("/vms/vm1"))
    assert 'id="vm-state" data-state="Running"' in page
    item = HaWork.objects.get(instance__name="vm1")
    block = page[page.index(f'id="work-{item.pk}"'):page.index('id="history-title"')]
    steps = re.findall(r'<span class="ev-kind">(\w+)</span>\s*<span class="transition">'
                       r'([^<]*)</span>', block)
    assert steps[0] == ("WorkScheduled", "· → Investigating")
    assert ("WorkStep", "Restarting → Done") in steps
    history = page[page.index('id="history-title"'):]
    assert 'data-event="HaStarted"' in history and 'data-event="HaStopped"' in history
    # A purged item still shows, from its events.
    HaWork.objects.filter(pk=item.pk).delete()
    page = html(op.get("/vms/vm1"))
    assert f'id="work-{item.pk}"' in page and "item purged" in page


def test_work_queue_filters(op, incident_world):
    w = HaWork.objects.get(instance__name="vm3")
    HaWork.objects.filter(pk=w.pk).update(step=Step.RESTARTING, taken=timezone.now(),
                                          taken_by="loop-7/w1", tried=2)
    page = html(op.get("/work"))
    rows = re.findall(r'data-work-id="(\d+)" data-step="(\w+)" data-type="(\w+)"', page)
    assert len(rows) == HaWork.objects.count() == 3
    assert "loop-7/w1" in page
    page = html(op.get("/work?step=Done"))
    rows = re.findall(r'data-work-id="(\d+)" data-step="(\w+)"', page)
    assert {s for _, s in rows} == {"Done"} and len(rows) == 2
    page = html(op.get("/work?show=open"))
    assert re.findall(r'data-work-id="(\d+)" data-step="(\w+)"', page) == [
        (str(w.pk), "Restarting")]
    assert re.findall(r'data-work-id', html(op.get("/work?type=Stop"))) == []


def test_incidents_page_charts_events_per_minute(op, incident_world):
    """The incident table itself (R18): dashboard/tests/test_incidents.py."""
    page = html(op.get("/incidents"))
    assert '<svg class="chart" id="chart-epm"' in page
    # events per minute: the bars add up to the events of the window (all of them here)
    epm = page[page.index('id="chart-epm"'):]
    epm = epm[:epm.index("</svg>")]
    values = [int(v) for v in re.findall(r'class="bar " [^>]*data-value="(\d+)"', epm)]
    assert len(values) == 60 and sum(values) == Event.objects.count()


def test_config_page_shows_values_in_force_with_admin_links(op, admin):
    config.set_value("ha.workers", "7", by="test")
    page = html(op.get("/config"))
    for name in config.KEYS:
        assert f'data-config="{name}"' in page
    row = re.search(r'<tr id="cfg-ha.workers" data-config="ha.workers" data-value="7" '
                    r'class="changed">(.*?)</tr>', page, re.S)
    assert row and "/admin/hadash/configuration/ha.workers/change/" in row.group(1)
    assert 'data-value="2.5"' in page  # ping.timeout default, as stored text
    assert 'id="config-admin"' not in page  # not staff
    staff = Client()
    staff.force_login(User.objects.create_user("sam", is_staff=True))
    assert 'id="config-admin"' in html(staff.get("/config"))


def test_pages_with_an_empty_database(op):
    for path in PAGES[:1] + ["/work", "/incidents", "/config"]:
        assert op.get(path).status_code == 200
    page = html(op.get("/"))
    assert 'id="fleet-empty"' in page and 'id="no-alerts"' in page
    assert "No incident" in html(op.get("/incidents"))


def test_static_files_are_served(op):
    for name in ("live.js", "pages.js", "dashboard.css"):
        r = op.get(f"/static/dashboard/{name}")
        assert r.status_code == 200
        assert b"".join(r.streaming_content)


# --- a big fleet ---------------------------------------------------------------------------


def big_fleet(hosts=1000, vms=10_000):
    now = timezone.now()
    statuses = [HostStatus.UP] * 17 + [HostStatus.ALERT, HostStatus.DOWN,
                                       HostStatus.DISCONNECTED]
    Host.objects.bulk_create([
        Host(name=f"kvm-{i:04d}", cluster=f"c{i % 10}", status=statuses[i % len(statuses)],
             resource_state=ResourceState.MAINTENANCE if i % 97 == 0 else ResourceState.ENABLED,
             last_ping=now, cpus=64, memory_mb=262144)
        for i in range(hosts)
    ], batch_size=500)
    ids = list(Host.objects.values_list("id", flat=True))
    VMInstance.objects.bulk_create([
        VMInstance(name=f"vm-{i:05d}", host_id=ids[i % len(ids)], last_host_id=ids[i % len(ids)],
                   state=VmState.RUNNING if i % 50 else VmState.STOPPED,
                   power_state=PowerState.POWER_ON, ha_enabled=bool(i % 2))
        for i in range(vms)
    ], batch_size=1000)
    Event.objects.bulk_create([
        Event(time=now, subject=Subject.HOST, subject_name=f"kvm-{i:04d}", event="HostDown",
              alert=i % 3 == 0, message=f"event {i}")
        for i in range(300)
    ])


def test_overview_of_a_big_fleet_has_a_bounded_number_of_queries(
        op, django_assert_max_num_queries):
    big_fleet()
    with django_assert_max_num_queries(16):  # + ha.workers and items in progress (issue 10)
        r = op.get("/")
    page = html(r)
    assert page.count('class="tile ') == 1000
    assert 'id="host-total">1000<' in page
    assert re.search(r'data-count="vm:Running"><b class="n">9800</b>', page)
    assert page.count("data-event-id=") == views.FEED_ROWS
    assert 'class="fleet-map compact"' in page
    assert "rs-Maintenance" in page
    with django_assert_max_num_queries(14):
        s = op.get("/summary.json").json()
    assert len(s["hosts"]) == 1000 and sum(h[5] for h in s["hosts"]) == 9800


# --- simulator panel ---------------------------------------------------------------------------


class FakeSimulator(BaseHTTPRequestHandler):
    """Just enough of the simulator's control API (docs/simulator.md)."""

    faults: list = []
    hosts = [
        {"name": "h1", "cluster": "c1", "cpus": 16, "memory_mb": 65536, "powered": True,
         "agent": True, "network": True, "bmc": True, "start_fail": 0, "reachable": True,
         "connected": True, "last_ping_age": 1.5, "ping_interval": 10,
         "vms": [{"name": "vm1", "power_state": "PowerOn"}], "starting": []},
    ]

    def log_message(self, *args):
        pass

    def reply(self, code, data):
        body = json.dumps(data).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/control/hosts":
            self.reply(200, self.hosts)
        else:
            self.reply(404, {"error": "no such path"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if "ghost" in body["do"]:
            self.reply(400, {"error": "no simulated host 'ghost'"})
            return
        self.faults.append(body["do"])
        self.reply(200, {"ok": True, "do": body["do"], "hosts": self.hosts})


@pytest.fixture
def simulator(settings):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSimulator)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    FakeSimulator.faults = []
    settings.HADASH_FLEET_URL = f"http://127.0.0.1:{server.server_port}"
    yield FakeSimulator
    server.shutdown()
    server.server_close()


def test_fleet_panel_is_absent_without_a_simulator(op, settings, monkeypatch):
    settings.HADASH_FLEET_URL = ""
    assert op.get("/fleet").status_code == 404
    assert 'id="nav-fleet"' not in html(op.get("/"))


def test_fleet_panel_shows_simulated_hosts_with_hadash_status(op, adm, simulator):
    world({"hosts": {"h1": {}}})
    page = html(op.get("/fleet"))
    assert 'id="nav-fleet"' in page
    assert 'data-sim-host="h1" data-powered="true"' in page
    assert 'data-db-status="Up"' in page
    assert "data-fault=" not in page  # operators get no fault buttons
    page = html(adm.get("/fleet"))
    assert 'data-fault="host h1 power off"' in page and 'data-fault="bmc h1 fail"' in page
    data = op.get("/fleet/hosts.json").json()
    assert data["hosts"][0]["name"] == "h1" and data["hosts"][0]["db_status"] == "Up"


def test_fleet_fault_is_proxied_for_admins(adm, simulator):
    r = adm.post("/fleet/fault", {"do": "host  h1 power off"}, HTTP_ACCEPT="application/json")
    assert r.status_code == 200 and r.json()["ok"] is True
    assert simulator.faults == ["host h1 power off"]
    # Form posts (no JavaScript) redirect back with a message.
    r = adm.post("/fleet/fault", {"do": "vm vm1 crash"}, follow=True)
    assert "Fault applied: vm vm1 crash" in html(r)
    # Not the vocabulary: refused before reaching the simulator.
    r = adm.post("/fleet/fault", {"do": "host h1 explode"}, HTTP_ACCEPT="application/json")
    assert r.status_code == 400 and "unknown fault" in r.json()["error"]
    # The simulator's own refusal is passed on.
    r = adm.post("/fleet/fault", {"do": "host ghost power off"},
                 HTTP_ACCEPT="application/json")
    assert r.status_code == 400 and r.json()["error"] == "no simulated host 'ghost'"
    assert simulator.faults == ["host h1 power off", "vm vm1 crash"]


def test_fleet_proxy_is_502_when_the_simulator_is_unreachable(op, adm, settings):
    port = free_port()
    settings.HADASH_FLEET_URL = f"http://127.0.0.1:{port}"
    r = op.get("/fleet/hosts.json")
    assert r.status_code == 502
    message = r.json()["error"]
    assert f"the simulator at http://127.0.0.1:{port} does not answer" in message
    r = adm.post("/fleet/fault", {"do": "host h1 power off"}, HTTP_ACCEPT="application/json")
    assert r.status_code == 502 and "does not answer" in r.json()["error"]
    page = html(op.get("/fleet"))  # the page itself still renders, with the reason
    assert "does not answer" in page and 'id="fleet-error"' in page


# --- live wiring -------------------------------------------------------------------------------


def test_pages_carry_what_the_live_client_needs(op, incident_world):
    top = Event.objects.latest("id").pk
    h1 = Host.objects.get(name="h1")
    page = html(op.get("/hosts/h1"))
    assert 'data-page="host"' in page and f'data-host-id="{h1.pk}"' in page
    assert f'data-live-top="{top}"' in page
    vm = VMInstance.objects.get(name="vm1")
    assert f'data-vm-id="{vm.pk}"' in html(op.get("/vms/vm1"))
    for path, name in (("/work", "work"), ("/incidents", "incidents"), ("/config", "config")):
        assert f'data-page="{name}"' in html(op.get(path))
    # An event committed now shows up on a fresh render (and over the socket).
    from django.db import transaction

    with transaction.atomic():
        record_event(Subject.HOST, h1, event="Test", message="hello operators")
    assert "hello operators" in html(op.get("/hosts/h1"))


def test_stop_of_a_stopped_vm_says_nothing_to_do(adm, incident_world):
    """R15a: stopping a VM that is already Stopped (vm2: not HA, its host died) succeeds
    and changes nothing — the dashboard says so instead of failing."""
    before = Event.objects.count()
    page = html(adm.post("/vms/vm2/stop", follow=True))
    assert "already Stopped; nothing to do" in page
    assert Event.objects.count() == before
    assert VMInstance.objects.get(name="vm2").state == VmState.STOPPED


def test_fleet_map_tiles_say_who_serves_each_host(op, incident_world):
    """Issue 9 part 5: a tile's title names the host's agent (real or simulator)."""
    Host.objects.filter(name="h2").update(agent_name="hadash-agent", agent_version="1.0.0")
    page = html(op.get("/"))
    tile = re.search(r'<a class="tile[^>]*data-host="h2"[^>]*>', page).group(0)
    assert "hadash-agent 1.0.0" in tile
    assert 'id="nav-unmanaged"' in page
