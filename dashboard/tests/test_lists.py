"""Host and VM list pages (issue 10 item 6) and the trial's server-side fixes (issue 10
item 7): search, filters, problem rows first, paging with a total, a fixed number of
queries at 1,000 hosts / 10,000 VMs; maintenance not offered on a Down host and
refused (R15); a confirmation naming the VM count; flashes that say what happened; the
engine card's numbers; relative times that tick; the skip link."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.test import Client
from django.utils import timezone

from dashboard import lists
from fleet.testing import world
from hadash.choices import Reason, Step, WorkType
from hadash.ha import actions
from hadash.models import HaWork
from hosts.choices import HostStatus, ResourceState
from hosts.models import Host
from vms.choices import PowerState, VmState
from vms.models import VMInstance

pytestmark = pytest.mark.django_db

User = get_user_model()


def client_in(group: str, name: str) -> Client:
    u = User.objects.create_user(name, password="pw-123456")
    u.groups.add(Group.objects.get(name=group))
    c = Client()
    c.force_login(u)
    return c


@pytest.fixture
def op() -> Client:
    return client_in("operators", "olga")


@pytest.fixture
def adm() -> Client:
    return client_in("admins", "adam")


def html(r) -> str:
    assert r.status_code == 200, r.status_code
    return r.content.decode()


def row_names(page: str, attr: str) -> list[str]:
    return re.findall(rf'<tr {attr}="([^"]+)"', page)


def fleet(hosts: int = 120, vms_per_host: int = 2):
    """``hosts`` hosts (kvm-000 …) Up and pinging now, a few in trouble, two clusters,
    tags on some; VMs Running on them."""
    now = timezone.now()
    Host.objects.bulk_create([
        Host(name=f"kvm-{i:03d}", cluster="east" if i % 2 else "west", status=HostStatus.UP,
             last_ping=now, cpus=32, memory_mb=131072, tags="gpu, ssd" if i % 10 == 0 else "")
        for i in range(hosts)
    ])
    ids = dict(Host.objects.values_list("name", "id"))
    VMInstance.objects.bulk_create([
        VMInstance(name=f"kvm-{i:03d}-vm{j}", host_id=ids[f"kvm-{i:03d}"], state=VmState.RUNNING,
                   power_state=PowerState.POWER_ON, ha_enabled=j == 0, cpus=2, memory_mb=2048)
        for i in range(hosts) for j in range(vms_per_host)
    ])
    Host.objects.filter(name="kvm-100").update(status=HostStatus.DOWN)
    Host.objects.filter(name="kvm-050").update(status=HostStatus.ALERT)
    Host.objects.filter(name="kvm-070").update(last_ping=now - dt.timedelta(seconds=60))
    Host.objects.filter(name="kvm-030").update(resource_state=ResourceState.ERROR_IN_MAINTENANCE)
    Host.objects.filter(name="kvm-020").update(resource_state=ResourceState.DISABLED)


# --- host list ---------------------------------------------------------------------------


def test_host_list_puts_problem_hosts_first_and_pages_by_50(op):
    """Issue 10 item 6: Down, Alert, behind on ping, ErrorInMaintenance … before Up;
    50 a page with the total and page links."""
    fleet()
    page = html(op.get("/hosts"))
    names = row_names(page, "data-host")
    assert len(names) == lists.PAGE_SIZE
    assert names[:5] == ["kvm-100", "kvm-050", "kvm-070", "kvm-030", "kvm-020"]
    assert names[5:8] == ["kvm-000", "kvm-001", "kvm-002"]  # then Up hosts by name
    assert 'data-behind="true"' in page and "behind on ping" in page
    assert 'data-total="120"' in page and "1–50 of <b class=\"list-total\">120</b>" in page
    assert 'data-page-link="3"' in page and 'rel="next"' in page and 'rel="prev"' not in page
    last = html(op.get("/hosts?page=3"))
    assert len(row_names(last, "data-host")) == 20
    assert "101–120 of" in last and 'rel="prev"' in last and 'rel="next"' not in last
    # A page past the end shows the last one; a bad page number the first.
    assert row_names(html(op.get("/hosts?page=99")), "data-host") == row_names(last, "data-host")
    assert row_names(html(op.get("/hosts?page=x")), "data-host")[0] == "kvm-100"


def test_host_list_search_and_filters(op):
    """Issue 10 item 6: name substring, status, cluster, tag, HA status (the R17 codes
    of the column: suspect, down, alert, error-in-maintenance, disabled, up); filters
    combine; page links keep them."""
    fleet()
    assert row_names(html(op.get("/hosts?q=-10")), "data-host") == [
        "kvm-100", *[f"kvm-{i}" for i in range(101, 110)]]
    down = html(op.get("/hosts?status=Down"))
    assert row_names(down, "data-host") == ["kvm-100"]
    assert 'data-total="1"' in down
    west_gpu = row_names(html(op.get("/hosts?cluster=west&tag=gpu")), "data-host")
    troubled = ["kvm-100", "kvm-050", "kvm-070", "kvm-030", "kvm-020"]  # all west, gpu
    assert west_gpu == troubled + [f"kvm-{i:03d}" for i in (0, 10, 40, 60, 80, 90, 110)]
    assert row_names(html(op.get("/hosts?ha=suspect")), "data-host") == ["kvm-070"]
    assert row_names(html(op.get("/hosts?ha=down")), "data-host") == ["kvm-100"]
    assert row_names(html(op.get("/hosts?ha=alert")), "data-host") == ["kvm-050"]
    assert row_names(html(op.get("/hosts?ha=error-in-maintenance")), "data-host") == [
        "kvm-030"]
    assert row_names(html(op.get("/hosts?ha=disabled&cluster=west")), "data-host") == [
        "kvm-020"]
    up = html(op.get("/hosts?ha=up"))
    assert 'data-total="115"' in up and 'data-ha-status="up"' in up
    assert 'data-ha-status="suspect"' not in up
    assert row_names(html(op.get("/hosts?rs=Disabled")), "data-host") == ["kvm-020"]
    empty = html(op.get("/hosts?q=nothing-like-this"))
    assert row_names(empty, "data-host") == [] and "No host matches." in empty
    # An unknown status is no filter at all, not an error page.
    assert len(row_names(html(op.get("/hosts?status=Bogus")), "data-host")) == 50
    paged = html(op.get("/hosts?cluster=east"))
    assert 'href="?cluster=east&amp;page=2"' in paged
    assert row_names(html(op.get("/hosts?sort=name")), "data-host")[0] == "kvm-000"


def test_host_list_of_a_big_fleet_costs_a_fixed_number_of_queries(
        op, django_assert_max_num_queries):
    """Issue 10 item 6: 1,000 hosts / 10,000 VMs — the page reads 50 rows and a few
    aggregates, whatever the size."""
    fleet(hosts=1000, vms_per_host=10)
    with django_assert_max_num_queries(20):  # ~8 ours, the rest R17 statuses (H4)
        page = html(op.get("/hosts?page=7"))
    assert len(row_names(page, "data-host")) == 50 and 'data-total="1000"' in page
    with django_assert_max_num_queries(20):  # ~8 ours, the rest R17 statuses (H4)
        page = html(op.get("/vms?page=20"))
    assert len(row_names(page, "data-vm")) == 50 and 'data-total="10000"' in page
    # R17: the HA status filter is a query, not a status computed for every row.
    with django_assert_max_num_queries(20):
        page = html(op.get("/vms?ha=unprotected&page=20"))
    assert len(row_names(page, "data-vm")) == 50 and 'data-total="9000"' in page
    # No BMC on the hosts of fleet(): every HA VM is at risk, but kvm-050-vm0 waits.
    with django_assert_max_num_queries(20):
        page = html(op.get("/vms?ha=at-risk&page=3"))
    assert len(row_names(page, "data-vm")) == 50 and 'data-total="999"' in page
    with django_assert_max_num_queries(20):
        page = html(op.get("/hosts?ha=up&page=7"))
    assert len(row_names(page, "data-host")) == 50 and 'data-total="995"' in page


# --- VM list -----------------------------------------------------------------------------


def test_vm_list_puts_problem_vms_first_and_filters(op):
    """Issue 10 item 6: Error, an HA item in progress, Running without PowerOn … before
    Running; search, state, cluster, host, HA filters."""
    fleet(hosts=30)
    now = timezone.now()
    VMInstance.objects.filter(name="kvm-011-vm0").update(state=VmState.ERROR)
    VMInstance.objects.filter(name="kvm-012-vm1").update(power_state=PowerState.POWER_OFF)
    vm = VMInstance.objects.get(name="kvm-013-vm0")
    HaWork.objects.create(instance=vm, vm_type=vm.type, type=WorkType.HA,
                          reason=Reason.VM_POWER_OFF, step=Step.SCHEDULED, host=vm.host,
                          state=vm.state, update_count=vm.update_count,
                          time_to_try=now + dt.timedelta(seconds=42), waiting="no-capacity",
                          created=now, updated=now)
    VMInstance.objects.filter(name="kvm-014-vm1").update(state=VmState.STOPPED)
    page = html(op.get("/vms"))
    names = row_names(page, "data-vm")
    assert names[:3] == ["kvm-011-vm0", "kvm-013-vm0", "kvm-012-vm1"]
    assert names[3] == "kvm-000-vm0" and "kvm-014-vm1" not in names  # Stopped is last
    row = page[page.index('<tr data-vm="kvm-013-vm0"'):page.index('<tr data-vm="kvm-012-vm1"')]
    assert "waiting" in row and "no-capacity" in row and 'data-until="' in row
    assert 'data-total="60"' in page
    # R17: an item that waits is `waiting`, not `recovering` (as in the column).
    assert row_names(html(op.get("/vms?ha=recovering")), "data-vm") == []
    assert row_names(html(op.get("/vms?ha=waiting")), "data-vm") == ["kvm-013-vm0"]
    assert row_names(html(op.get("/vms?ha=failed")), "data-vm") == ["kvm-011-vm0"]
    assert row_names(html(op.get("/vms?ha=stopped")), "data-vm") == ["kvm-014-vm1"]
    assert row_names(html(op.get("/vms?state=Stopped")), "data-vm") == ["kvm-014-vm1"]
    assert row_names(html(op.get("/vms?host=kvm-002")), "data-vm") == [
        "kvm-002-vm0", "kvm-002-vm1"]
    assert len(row_names(html(op.get("/vms?ha=off")), "data-vm")) == 30
    east = row_names(html(op.get("/vms?cluster=east&q=vm1&power=PowerOn")), "data-vm")
    assert east == [f"kvm-{i:03d}-vm1" for i in range(1, 30, 2)]


def test_r17_vms_waiting_on_an_unreachable_host_are_found_by_the_waiting_filter(op):
    """R17: an HA VM on a host in Alert is 'waiting: host-unreachable' (no HA item yet).
    Filtering the VM list on "waiting" finds it and problems-first puts it before the
    healthy VMs; its host's VM without HA is not waiting. (The filter looked only at HA
    items, so the 'waiting' VMs of the list were not found by 'waiting'.)"""
    fleet(hosts=30)
    Host.objects.filter(name="kvm-015").update(status=HostStatus.ALERT)
    Host.objects.filter(name="kvm-012").update(
        resource_state=ResourceState.ERROR_IN_MAINTENANCE)
    assert row_names(html(op.get("/vms?ha=waiting")), "data-vm") == ["kvm-015-vm0"]
    page = html(op.get("/vms"))
    assert row_names(page, "data-vm")[0] == "kvm-015-vm0"
    row = page[page.index('<tr data-vm="kvm-015-vm0"'):]
    row = row[:row.index("</tr>")]
    assert "waiting" in row and "host-unreachable" in row


def options(page: str, select_id: str) -> list[str]:
    select = page[page.index(f'id="{select_id}"'):]
    select = select[:select.index("</select>")]
    return re.findall(r'<option value="([^"]+)"', select)


def test_r17_ha_status_filters_offer_the_codes_of_the_column_and_select_them(op):
    """R17 (issue 10 item 6): the HA status filter offers exactly the codes the HA
    status column shows (and, for VMs, the VM's own HA setting); each option lists
    exactly the rows whose column shows that code."""
    from hosts import hastatus as host_hastatus
    from vms import hastatus as vm_hastatus

    fleet(hosts=30)
    VMInstance.objects.filter(name="kvm-011-vm0").update(state=VmState.ERROR)
    VMInstance.objects.filter(name="kvm-014-vm1").update(state=VmState.STOPPED)
    Host.objects.filter(name__in=["kvm-003", "kvm-004"]).update(
        oobm_enabled=True, oobm_address="https://10.0.0.1")
    Host.objects.filter(name="kvm-010").update(status=HostStatus.DOWN)
    Host.objects.filter(name="kvm-015").update(status=HostStatus.ALERT)
    Host.objects.filter(name="kvm-012").update(
        resource_state=ResourceState.ERROR_IN_MAINTENANCE)
    Host.objects.filter(name="kvm-017").update(
        last_ping=timezone.now() - dt.timedelta(seconds=60))
    all_vms = html(op.get("/vms"))
    assert options(all_vms, "vm-ha-filter") == [*vm_hastatus.CODES, "on", "off"]
    assert "setting: ha_enabled on" in all_vms and "at-risk — would not fit" in all_vms
    shown = {}
    for code in vm_hastatus.CODES:
        page = html(op.get(f"/vms?ha={code}"))
        names = row_names(page, "data-vm")
        assert re.findall(r'data-ha-status="([^"]+)"', page) == [code] * len(names)
        shown.update(dict.fromkeys(names, code))
    assert len(shown) == 60  # every VM under exactly one option
    assert shown["kvm-003-vm0"] == "protected" and shown["kvm-005-vm0"] == "at-risk"
    assert shown["kvm-011-vm0"] == "failed" and shown["kvm-003-vm1"] == "unprotected"
    assert shown["kvm-015-vm0"] == "waiting" and shown["kvm-014-vm1"] == "stopped"
    hosts_page = html(op.get("/hosts"))
    assert options(hosts_page, "host-ha-filter") == list(host_hastatus.CODES)
    for code in ("down", "alert", "suspect", "error-in-maintenance", "disabled", "up"):
        page = html(op.get(f"/hosts?ha={code}"))
        names = row_names(page, "data-host")
        assert names and re.findall(r'data-ha-status="([^"]+)"', page) == [code] * len(names)


def test_lists_are_in_the_nav_with_a_skip_link_first(op):
    """Issue 10 item 6: Hosts and VMs in the navigation; "Skip to alerts" is the first
    focusable element of every page."""
    page = html(op.get("/vms"))
    body = page[page.index("<body"):]
    first = re.search(r"<(a|button|input|select)\b[^>]*>", body[body.index(">") + 1:]).group(0)
    assert 'id="skip-to-alerts"' in first and 'href="/#alerts-panel"' in first
    assert 'id="nav-hosts"' in page and 'id="nav-vms" aria-current="page"' not in page
    assert re.search(r'aria-current="page" id="nav-vms"', page)
    assert 'href="#alerts-panel"' in html(op.get("/"))


# --- maintenance (R15) -------------------------------------------------------------------


@pytest.fixture
def small():
    return world({"hosts": {"h1": {}, "h2": {}, "h3": {}},
                  "vms": {"vm1": {"host": "h1", "ha": True}, "vm2": {"host": "h1"},
                          "vm3": {"host": "h2"}}})


def test_maintenance_is_not_offered_on_a_down_host_and_is_refused(adm, small):
    """Issue 10 item 7 / R15: maintenance live-migrates running VMs, which needs the
    host Up: a Down host offers no button, and a POST is refused with the reason."""
    Host.objects.filter(name="h1").update(status=HostStatus.DOWN)
    page = html(adm.get("/hosts/h1"))
    assert 'id="host-action-maintenance"' not in page and 'id="host-action-disable"' in page
    page = html(adm.post("/hosts/h1/maintenance", {"confirm": "yes"}, follow=True))
    assert "Refused: host h1 is Down: maintenance live-migrates its running VMs" in page
    assert Host.objects.get(name="h1").resource_state == ResourceState.ENABLED
    confirm = html(adm.get("/hosts/h1/maintenance"))
    assert 'id="maintenance-refusal"' in confirm and 'id="maintenance-form"' not in confirm
    # The API refuses it the same way (409).
    with pytest.raises(actions.ActionError, match="needs the host Up"):
        actions.prepare_maintenance(Host.objects.get(name="h1"), now=timezone.now())


def test_maintenance_asks_for_confirmation_naming_the_vm_count(adm, small):
    """Issue 10 item 7: one click is not enough — a confirmation page says how many
    running VMs will be migrated; only its confirmed POST starts maintenance, and the
    flash says what happened."""
    page = html(adm.get("/hosts/h1"))
    assert re.search(r'<a class="btn btn-warn" href="/hosts/h1/maintenance"', page)
    confirm = html(adm.get("/hosts/h1/maintenance"))
    assert "Put h1 into maintenance?" in confirm
    assert "<strong>2 running VMs</strong> will be migrated" in confirm
    assert 'name="confirm" value="yes"' in confirm
    # Unconfirmed: the same question again, nothing changed.
    again = html(adm.post("/hosts/h1/maintenance"))
    assert "Maintenance not confirmed; nothing changed." in again
    assert Host.objects.get(name="h1").resource_state == ResourceState.ENABLED
    done = html(adm.post("/hosts/h1/maintenance", {"confirm": "yes"}, follow=True))
    assert "Maintenance of h1 started: 2 VMs migrating" in done
    assert "done — resource state" not in done
    assert Host.objects.get(name="h1").resource_state == ResourceState.PREPARE_FOR_MAINTENANCE
    # A host with nothing running goes straight to Maintenance, and says so.
    done = html(adm.post("/hosts/h3/maintenance", {"confirm": "yes"}, follow=True))
    assert "Host h3 is now in Maintenance" in done


def test_maintenance_confirmation_is_for_admins_only(op, small):
    assert op.get("/hosts/h1/maintenance").status_code == 403
    assert op.post("/hosts/h1/maintenance", {"confirm": "yes"}).status_code == 403
    assert Host.objects.get(name="h1").resource_state == ResourceState.ENABLED


# --- engine card, ticking times ---------------------------------------------------------------


def test_engine_card_shows_installation_slots_and_items_in_progress(op, small):
    """Issue 10 item 7: the card shows ha.workers (not a sum over loops) and the HA
    items taken with an unexpired lease (not the loops' busy counters)."""
    from hadash.models import Configuration, EngineProcess

    Configuration.objects.update_or_create(name="ha.workers", defaults={"value": "8"})
    now = timezone.now()
    for i in range(2):
        EngineProcess.objects.create(id=f"loop-{i}", host="test", pid=1 + i, started=now,
                                     heartbeat=now, workers=8, busy=5)
    vm = VMInstance.objects.get(name="vm1")
    HaWork.objects.create(instance=vm, vm_type=vm.type, type=WorkType.HA, reason=Reason.OPERATOR,
                          step=Step.INVESTIGATING, host=vm.host, state=vm.state,
                          update_count=vm.update_count, time_to_try=now, taken=now,
                          taken_by="loop-0", created=now, updated=now)
    page = html(op.get("/"))
    assert re.search(r'id="engine-workers"[^>]*>8</span> HA slots', page)
    assert re.search(r'id="engine-busy"[^>]*>1</span> in progress', page)
    eng = op.get("/summary.json").json()["engine"]
    assert eng["workers"] == 8 and eng["busy"] == 1


def test_relative_times_carry_iso_timestamps_to_tick(op, small):
    """Issue 10 item 7: "last ping … ago" and "next try in …" are rendered with their
    ISO time in data attributes that static/dashboard/ticks.js counts from."""
    now = timezone.now()
    vm = VMInstance.objects.get(name="vm3")
    HaWork.objects.create(instance=vm, vm_type=vm.type, type=WorkType.HA, reason=Reason.OPERATOR,
                          step=Step.SCHEDULED, host=vm.host, state=vm.state,
                          update_count=vm.update_count, time_to_try=now + dt.timedelta(minutes=2),
                          created=now, updated=now)
    host_page = html(op.get("/hosts/h1"))
    assert re.search(r'<dd id="host-last-ping"><time class="tick" datetime="[^"]+" '
                     r'title="[^"]+" data-ago="[^"]+">[^<]+</time>', host_page)
    vm_page = html(op.get("/vms/vm3"))
    assert re.search(r'next try <time class="tick" [^>]*data-until="[^"]+">in 1 min 59 s|'
                     r'next try <time class="tick" [^>]*data-until="[^"]+">in 2 min', vm_page)
    assert '/static/dashboard/ticks.js' in vm_page


def test_vm_header_is_a_live_region_with_state_power_and_host(op, small):
    """Issue 10 item 7: the header that live updates re-read (#vm-head) carries state,
    power state and host, so a restart's PowerOn replaces an earlier PowerOff."""
    page = html(op.get("/vms/vm1"))
    head = page[page.index('id="vm-head"'):page.index("</h1>")]
    assert 'id="vm-state" data-state="Running"' in head
    assert 'id="vm-power" data-power="PowerOn"' in head
    assert 'id="vm-head-host" data-host="h1"' in head


def test_map_tiles_name_host_status_and_vms_for_screen_readers(op, small):
    """Issue 10 item 6: a tile's accessible name carries the host, its status (and a
    resource state other than Enabled) and its VM count, not only a colour."""
    Host.objects.filter(name="h2").update(resource_state=ResourceState.DISABLED)
    # On time by the wall clock the page reads (the world's clock is virtual).
    Host.objects.update(last_ping=timezone.now())
    page = html(op.get("/"))
    assert re.search(r'<a class="tile [^"]*"[^>]*data-host="h1"[^>]*aria-label="h1: Up, 2 VMs"',
                     page)
    assert 'aria-label="h2: Up, Disabled, 1 VMs"' in page
