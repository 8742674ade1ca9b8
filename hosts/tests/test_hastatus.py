"""HA status of hosts (SPEC R17): up, suspect (behind on ping, verdict due), an
investigation under way, alert (host-unreachable), down (with its incident's state),
maintenance states and disabled — driven through the real engine on a simulated fleet
with virtual time (fleet.testing.world). Also the bulk helper's fixed number of
queries and the API's `ha_status`."""

from __future__ import annotations

import datetime as dt

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from fleet.testing import world
from hadash.models import ApiToken
from hosts import hastatus
from hosts.models import Host

pytestmark = pytest.mark.django_db

FLEET = {"hosts": {"h1": {}, "h2": {}, "h3": {}},
         "vms": {"vm1": {"host": "h1", "ha": True}}}


def status(w, name):
    return hastatus.status_of(Host.objects.get(name=name), now=w.clock.now())


def test_r17_host_on_time_is_up():
    w = world(FLEET)
    w.advance_to(5)
    s = status(w, "h1")
    assert s.code == "up" and s.reason.startswith("Up")
    assert s.since is not None and s.next_try is None


def test_r17_late_ping_is_announced_before_the_host_is_behind():
    """R17: a missed ping shows on an Up host before it is behind: when it will be."""
    w = world(FLEET)
    w.advance_to(5)
    w.fleet.power_off("h1")
    w.advance_to(15)  # the ping due at 10 s is missing
    h1 = Host.objects.get(name="h1")
    s = status(w, "h1")
    behind_at = h1.last_ping + dt.timedelta(seconds=25)  # ping.interval × ping.timeout
    assert s.code == "up" and "a ping is late" in s.reason
    assert f"behind on ping at {behind_at:%H:%M:%S}" in s.reason


def test_r17_behind_on_ping_before_the_sweep_is_suspect_with_verdict_due():
    """R17: behind on ping (now − last ping > ping.interval × ping.timeout) while still
    Up → suspect, saying how long and when the verdict is due — before any declaration."""
    w = world(FLEET)
    w.advance_to(5)
    w.fleet.power_off("h1")
    w.advance_to(20)
    h1 = Host.objects.get(name="h1")
    # The moment after it falls behind, before the engine's next sweep looks at it.
    w.clock.set((h1.last_ping - w.clock.EPOCH).total_seconds() + 26)
    s = status(w, "h1")
    assert h1.status == "Up"
    assert s.code == "suspect"
    assert "behind on ping for 26 s (limit 25 s)" in s.reason and "verdict due at" in s.reason
    assert s.since == h1.last_ping + dt.timedelta(seconds=25)
    assert s.next_try > w.clock.now()


def test_r17_undeterminable_host_is_investigating_until_alert_wait():
    """R17/R5: cut off, its BMC failing and no neighbour asked, the host cannot be
    judged: it stays Up under investigation; the status says so and when it goes to
    Alert (alert.wait)."""
    w = world({**FLEET, "config": {"alert.wait": 300,
                                   "ha.investigators.order": "CheckOnAgent,OutOfBand"}})
    w.apply("host h1 network off")
    w.apply("bmc h1 fail")
    w.advance_to(60)
    h1 = Host.objects.get(name="h1")
    s = status(w, "h1")
    assert h1.status == "Up"
    assert s.code == "investigating"
    assert s.next_try == h1.last_ping + dt.timedelta(seconds=300)
    assert "Alert at" in s.reason


def test_r17_alive_host_without_agent_is_alert_with_next_investigation():
    """R17/R5: the agent stops, the host is alive → Alert (host-unreachable), with its
    next investigation as next_try and the time it went Alert as since."""
    w = world(FLEET)
    w.apply("host h1 agent stop")
    w.advance_to(40)
    h1 = Host.objects.get(name="h1")
    s = status(w, "h1")
    assert h1.status == "Alert"
    assert s.code == "alert" and s.reason.startswith("host-unreachable")
    assert s.next_try == h1.next_investigation and s.since is not None


def test_r17_r18_down_host_names_its_incident_state():
    """R17/R18: a Down host's status names its incident and how far recovery got."""
    w = world(FLEET)
    w.fleet.power_off("h1")
    w.advance_to(60)
    s = status(w, "h1")
    assert Host.objects.get(name="h1").status == "Down"
    assert s.code == "down" and "is Down" in s.reason
    assert s.since is not None
    from hadash.models import Incident

    incident = Incident.objects.filter(host__name="h1").order_by("-id").first()
    if incident is not None:  # incidents (R18) recorded by the engine
        assert f"incident #{incident.pk} {incident.state}" in s.reason


def test_r17_r15_maintenance_and_disabled_are_shown():
    """R17/R15: prepare-for-maintenance, maintenance, disabled."""
    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {"a": {"host": "h1"}}})
    w.apply("host h1 maintenance")
    assert status(w, "h1").code == "prepare-for-maintenance"
    w.advance_to(2)
    assert status(w, "h1").code == "maintenance"
    w.apply("host h1 cancel-maintenance")
    assert status(w, "h1").code == "up"
    w.apply("host h2 disable")
    s = status(w, "h2")
    assert s.code == "disabled" and s.since == w.clock.now()


def test_r17_host_without_working_bmc_says_its_vms_are_at_risk():
    """R17/R28: an Up host whose BMC is missing or failing its check says its HA VMs
    are at risk."""
    w = world(FLEET)
    Host.objects.filter(name="h2").update(oobm_enabled=False)
    s = status(w, "h2")
    assert s.code == "up" and "no BMC configured" in s.reason and "at risk" in s.reason
    h3 = Host.objects.get(name="h3")
    s = hastatus.statuses_for([h3], now=w.clock.now(), bmc_failing={h3.pk: "timeout"})[h3.pk]
    assert "timeout" in s.reason


def test_r17_bulk_host_statuses_cost_the_same_queries_for_2_or_12_hosts():
    w = world({"hosts": {f"h{i:02}": {} for i in range(12)}})
    w.fleet.power_off("h00")
    w.advance_to(60)
    counts = []
    for n in (2, 12):
        page = list(Host.objects.order_by("name")[:n])
        with CaptureQueriesContext(connection) as q:
            assert len(hastatus.statuses_for(page, now=w.clock.now())) == n
        counts.append(len(q))
    assert counts[0] == counts[1]


def test_r17_api_hosts_carry_ha_status():
    """R17: GET /api/v1/hosts and /api/v1/hosts/{name} carry `ha_status`."""
    w = world(FLEET)
    w.fleet.power_off("h1")
    w.advance_to(60)
    _, key = ApiToken.issue(get_user_model().objects.create_user("viewer"))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    # The API reads the wall clock; the world runs on virtual time.
    Host.objects.exclude(name="h1").update(last_ping=timezone.now())
    rows = {r["name"]: r["ha_status"] for r in client.get("/api/v1/hosts").json()}
    assert rows["h1"]["code"] == "down" and rows["h2"]["code"] == "up"
    assert set(rows["h2"]) == {"code", "reason", "since", "next_try"}
    assert client.get("/api/v1/hosts/h1").json()["ha_status"] == rows["h1"]


# --- dashboard ---------------------------------------------------------------------------

@pytest.fixture
def viewer_client():
    from django.test import Client

    c = Client()
    c.force_login(get_user_model().objects.create_user("olga"))
    return c


def _behind(name, seconds):
    """The dashboard reads the wall clock: put the host's last ping `seconds` ago."""
    Host.objects.filter(name=name).update(last_ping=timezone.now()
                                          - dt.timedelta(seconds=seconds))


def test_r17_host_page_shows_suspect_with_the_word_and_verdict_due(viewer_client):
    """R17: a host behind on ping shows `suspect` on its page, in words (not colour
    only) with when the verdict is due — before anything is declared."""
    world(FLEET)
    Host.objects.update(last_ping=timezone.now())
    _behind("h1", 40)
    page = viewer_client.get("/hosts/h1").content.decode()
    assert 'id="host-ha-status"' in page
    assert 'data-ha-status="suspect"' in page and ">suspect</span>" in page
    assert "behind on ping for 40 s (limit 25 s); verdict due at" in page
    page = viewer_client.get("/hosts/h2").content.decode()
    assert 'data-ha-status="up"' in page


def test_r17_vm_page_shows_waiting_cause(viewer_client):
    """R17: the VM page shows `waiting: host-unreachable` while its host is in Alert."""
    w = world(FLEET)
    w.apply("host h1 agent stop")
    w.advance_to(40)
    page = viewer_client.get("/vms/vm1").content.decode()
    assert 'id="vm-ha-status"' in page
    assert 'data-ha-status="waiting"' in page and 'data-ha-cause="host-unreachable"' in page
    assert "waiting: host-unreachable" in page


def test_r17_simulator_panel_hosts_json_carries_ha_status(viewer_client, settings):
    """R17: the simulator panel's hosts (fleet/hosts.json) carry hadash's HA status,
    so a host behind on ping shows `suspect` there too."""
    import threading
    from http.server import ThreadingHTTPServer

    from dashboard.tests.test_pages import FakeSimulator

    world(FLEET)
    _behind("h1", 30)
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSimulator)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings.HADASH_FLEET_URL = f"http://127.0.0.1:{server.server_port}"
        data = viewer_client.get("/fleet/hosts.json").json()
    finally:
        server.shutdown()
        server.server_close()
    [h1] = data["hosts"]
    assert h1["ha_status"]["code"] == "suspect"
    assert h1["ha_status"]["reason"].startswith("behind on ping for 30 s")


# --- the list's HA status filter: a queryset per code ----------------------------------

def assert_filter_matches_statuses(w):
    """For every R17 code, filter_code's rows are exactly the hosts whose computed
    status has that code (and every host has one of the codes)."""
    from hadash import config

    now = w.clock.now()
    cfg = config.snapshot()
    hosts = list(Host.objects.all())
    computed = hastatus.statuses_for(hosts, now=now, cfg=cfg)
    seen = set()
    for code in hastatus.CODES:
        rows = set(hastatus.filter_code(Host.objects.all(), code, now=now, cfg=cfg)
                   .values_list("name", flat=True))
        want = {h.name for h in hosts if computed[h.pk].code == code}
        assert rows == want, (code, sorted(rows), sorted(want))
        seen |= rows
    assert seen == {h.name for h in hosts}
    return {h.name: computed[h.pk].code for h in hosts}


def test_r17_filter_code_selects_exactly_the_hosts_with_each_code():
    """R17 (issue 10 item 6): the host list's HA status filter selects in the database
    exactly the hosts whose status shows that code, second by second through failures:
    a host powered off (suspect, then Down), one cut off with its BMC failing
    (investigating, then Alert at alert.wait), one whose agent stops, maintenance
    (preparing, done, in error), disabled, statuses set by hand (Disconnected,
    Creating, Error)."""
    w = world({"hosts": {f"h{i}": {} for i in range(1, 9)},
               "vms": {"vm1": {"host": "h1", "ha": True}, "vm8": {"host": "h8"}},
               "config": {"alert.wait": 300,
                          "ha.investigators.order": "CheckOnAgent,OutOfBand"}})
    Host.objects.create(name="new", status="Creating")
    Host.objects.create(name="gone", status="Disconnected", last_ping=timezone.now())
    Host.objects.create(name="bad", status="Error")
    w.advance_to(5)
    w.fleet.power_off("h1")
    w.apply("host h2 network off")
    w.apply("bmc h2 fail")
    w.apply("host h3 agent stop")
    w.apply("host h4 disable")
    w.apply("host h8 maintenance")  # a VM it cannot migrate: error-in-maintenance
    w.apply("host h6 maintenance")
    seen = set(assert_filter_matches_statuses(w).values())
    for t in [*range(6, 70, 2), *range(70, 400, 30)]:
        w.advance_to(t)
        seen |= set(assert_filter_matches_statuses(w).values())
    # Behind on ping before the sweep looks (suspect), and with an investigation
    # planned before its last ping (an episode that is over: suspect again).
    now = w.clock.now()
    Host.objects.filter(name="h7").update(last_ping=now - dt.timedelta(seconds=26))
    Host.objects.filter(name="h5").update(last_ping=now - dt.timedelta(seconds=40),
                                          next_investigation=now - dt.timedelta(seconds=50))
    codes = assert_filter_matches_statuses(w)
    assert codes["h7"] == codes["h5"] == "suspect"
    seen |= set(codes.values())
    assert {"up", "suspect", "down", "alert", "investigating", "disabled", "maintenance",
            "prepare-for-maintenance", "error-in-maintenance", "connecting",
            "disconnected", "error"} <= seen
    assert not hastatus.filter_code(Host.objects.all(), "bogus",
                                    now=w.clock.now()).exists()
