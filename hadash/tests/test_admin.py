"""Django admin (SPEC §1–2; PROTOCOL.md "Out-of-band management", "Operator API"):
configuration is edited in admin with validation, saved through hadash.config (an
event, effective at once); hosts, VMs, HA work and events are browsable with filters;
engine-owned fields are read-only."""

from __future__ import annotations

import pytest
from django.contrib.admin.utils import quote
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from hadash import config
from hadash.choices import Reason, Step, Subject, WorkType
from hadash.events import record_event
from hadash.models import Configuration, Event, HaWork
from hosts.choices import HostStatus, ResourceState
from hosts.models import Host
from vms.choices import PowerState, VmState
from vms.models import VMInstance

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client_() -> Client:
    user = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    client = Client()
    client.force_login(user)
    return client


def change_url(model: str, pk) -> str:
    return reverse(f"admin:{model}_change", args=[quote(str(pk))])


def make_host(name="kvm-01", **kw) -> Host:
    fields = dict(status=HostStatus.UP, resource_state=ResourceState.ENABLED, cluster="c1",
                  cpus=32, memory_mb=131072, last_ping=timezone.now())
    fields.update(kw)
    return Host.objects.create(name=name, **fields)


def make_vm(name, host) -> VMInstance:
    return VMInstance.objects.create(name=name, host=host, last_host=host,
                                     state=VmState.RUNNING, power_state=PowerState.POWER_ON)


def world():
    host = make_host()
    make_host("kvm-02", status=HostStatus.DOWN, cluster="c2")
    vm = make_vm("v1", host)
    now = timezone.now()
    HaWork.objects.create(instance=vm, vm_type="User", type=WorkType.HA,
                          reason=Reason.HOST_DOWN, step=Step.SCHEDULED, host=host,
                          state=vm.state, update_count=0, time_to_try=now, created=now,
                          updated=now)
    from django.db import transaction

    with transaction.atomic():
        alert = record_event(Subject.HOST, host, event="HostDown", field="status", old="Up",
                             new="Down", alert=True)
    return host, vm, alert


# --- configuration (SPEC §2) --------------------------------------------------


def test_config_change_form_saves_through_config(admin_client_):
    """SPEC §2: ha.workers edited in admin takes effect without a restart, and the
    change is written as a ConfigChanged event."""
    url = change_url("hadash_configuration", "ha.workers")
    r = admin_client_.get(url)
    assert r.status_code == 200
    assert b"from 1 to 1000" in r.content  # the help text gives the range
    r = admin_client_.post(url, {"value": " 8 "})
    assert r.status_code == 302, r.content.decode()[:2000]
    assert config.get("ha.workers") == 8
    assert Configuration.objects.get(name="ha.workers").value == "8"
    ev = Event.objects.get(event="ConfigChanged")
    assert (ev.subject_name, ev.old, ev.new, ev.reason) == ("ha.workers", "5", "8", "root")


@pytest.mark.parametrize(
    "key,value,message",
    [("ha.workers", "0", "ha.workers must be at least 1, not 0"),
     ("ping.interval", "abc", "ping.interval must be a whole number, not &#x27;abc&#x27;"),
     ("ha.investigators.order", "Neighbour,Oracle", "unknown investigator(s) Oracle"),
     ("ha.max.hosts.down.ratio", "1.5", "ha.max.hosts.down.ratio must be at most 1")],
)
def test_config_change_form_refuses_bad_value(admin_client_, key, value, message):
    """SPEC §2: a bad value is refused in admin with a clear message; nothing changes."""
    before = Configuration.objects.get(name=key).value
    r = admin_client_.post(change_url("hadash_configuration", key), {"value": value})
    assert r.status_code == 200
    assert message in r.content.decode()
    assert "errorlist" in r.content.decode()
    assert Configuration.objects.get(name=key).value == before
    assert not Event.objects.exists()


def test_config_name_is_read_only_and_rows_not_added_or_deleted(admin_client_):
    url = change_url("hadash_configuration", "ha.workers")
    r = admin_client_.post(url, {"value": "7", "name": "ping.interval"})
    assert r.status_code == 302
    assert config.get("ha.workers") == 7 and config.get("ping.interval") == 10
    assert admin_client_.get(reverse("admin:hadash_configuration_add")).status_code == 403
    r = admin_client_.get(reverse("admin:hadash_configuration_delete",
                                  args=[quote("ha.workers")]))
    assert r.status_code == 403


def test_config_changelist(admin_client_):
    r = admin_client_.get(reverse("admin:hadash_configuration_changelist") + "?category=HA")
    assert r.status_code == 200
    assert b"ha.workers" in r.content and b"ping.interval" not in r.content


# --- changelists ------------------------------------------------------------------


@pytest.mark.parametrize(
    "model,query,present,absent",
    [("hosts_host", "", "kvm-02", None),
     ("hosts_host", "?status__exact=Down", "kvm-02", "kvm-01"),
     ("hosts_host", "?resource_state__exact=Enabled&cluster=c1&type__exact=Routing", "kvm-01",
      "kvm-02"),
     ("vms_vminstance", "?state__exact=Running&power_state__exact=PowerOn&ha_enabled__exact=0",
      "v1", None),
     ("hadash_hawork", "?step__exact=Scheduled&type__exact=HA&reason__exact=HostDown", "v1",
      None),
     ("hadash_event", "?alert__exact=1&subject__exact=host&severity__exact=critical",
      "HostDown", None),
     ("hadash_event", "?acknowledged=no", "HostDown", None)],
)
def test_changelists_render_with_filters(admin_client_, model, query, present, absent):
    """SPEC §1: hosts, VMs, HA work and events are browsable, filtered by status."""
    world()
    r = admin_client_.get(reverse(f"admin:{model}_changelist") + query)
    assert r.status_code == 200
    assert "?e=1" not in r.get("Location", "")
    html = r.content.decode()
    assert present in html
    if absent:
        assert f">{absent}<" not in html


def test_work_and_events_are_read_only(admin_client_):
    _, _, alert = world()
    item = HaWork.objects.get()
    r = admin_client_.get(change_url("hadash_hawork", item.pk))
    assert r.status_code == 200 and b'name="_save"' not in r.content
    r = admin_client_.post(change_url("hadash_hawork", item.pk), {"step": "Done"})
    assert r.status_code == 403
    assert HaWork.objects.get().step == Step.SCHEDULED
    r = admin_client_.get(change_url("hadash_event", alert.pk))
    assert r.status_code == 200 and b'name="_save"' not in r.content


def test_acknowledge_action(admin_client_):
    _, _, alert = world()
    r = admin_client_.post(reverse("admin:hadash_event_changelist"),
                           {"action": "acknowledge", "_selected_action": [alert.pk]})
    assert r.status_code == 302
    alert.refresh_from_db()
    assert alert.acknowledged_at is not None and alert.acknowledged_by == "root"


# --- hosts and VMs ------------------------------------------------------------------


def test_host_change_form_sets_oobm_and_keeps_engine_fields(admin_client_):
    """PROTOCOL.md: a host's BMC settings are set by an operator (admin); the password
    is never shown; the agent-maintained fields are read-only."""
    host = make_host(oobm_password="old-secret")
    url = change_url("hosts_host", host.pk)
    r = admin_client_.get(url)
    assert r.status_code == 200
    html = r.content.decode()
    assert "old-secret" not in html and "token_hash" not in html
    assert 'name="status"' not in html and 'name="oobm_address"' in html
    data = {"tags": "ssd, ha", "oobm_enabled": "on", "oobm_address": "https://10.0.1.11",
            "oobm_system_id": "sys-1", "oobm_username": "root", "oobm_password": "",
            "status": "Down"}
    r = admin_client_.post(url, data)
    assert r.status_code == 302, r.content.decode()[:3000]
    host.refresh_from_db()
    assert (host.tags, host.oobm_enabled, host.oobm_address, host.oobm_password) == (
        "ssd,ha", True, "https://10.0.1.11", "old-secret")
    assert host.status == HostStatus.UP
    ev = Event.objects.get(event="SettingsChanged")
    assert ev.reason == "root" and "old-secret" not in ev.message

    r = admin_client_.post(url, {**data, "oobm_password": "new"})
    host.refresh_from_db()
    assert host.oobm_password == "new"
    r = admin_client_.post(url, {**data, "oobm_enabled": "on", "oobm_address": ""})
    assert r.status_code == 200 and "needs a BMC address" in r.content.decode()


def test_host_admin_actions(admin_client_):
    host = make_host()
    r = admin_client_.post(reverse("admin:hosts_host_changelist"),
                           {"action": "disable_hosts", "_selected_action": [host.pk]})
    assert r.status_code == 302
    host.refresh_from_db()
    assert host.resource_state == ResourceState.DISABLED
    assert Event.objects.filter(event="ResourceStateChanged", reason="root").exists()


def test_vm_change_form_sets_ha_only(admin_client_):
    host = make_host()
    vm = make_vm("v1", host)
    url = change_url("vms_vminstance", vm.pk)
    assert admin_client_.get(url).status_code == 200
    r = admin_client_.post(url, {"ha_enabled": "on", "priority": "high", "state": "Stopped"})
    assert r.status_code == 302, r.content.decode()[:3000]
    vm.refresh_from_db()
    assert (vm.ha_enabled, vm.priority, vm.state) == (True, "high", VmState.RUNNING)
    assert Event.objects.filter(event="SettingsChanged", subject="vm").exists()


@pytest.mark.parametrize(
    "key,value,message",
    [("ha.tag", "a\x00b", "Null characters are not allowed"),
     ("ha.tag", "t" * 4097, "at most 4096 characters"),
     ("ha.investigators.order", "Neighbour" + "," * 4100, "at most 4096 characters"),
     ("ha.tag", "a\x07b", "control characters")],
)
def test_config_change_form_refuses_unstorable_value(admin_client_, key, value, message):
    """Issue 8: a value the column cannot hold (NUL, over 4096 characters) is refused in
    admin with the reason, like in the API; nothing changes."""
    before = Configuration.objects.get(name=key).value
    r = admin_client_.post(change_url("hadash_configuration", key), {"value": value})
    assert r.status_code == 200
    assert message in r.content.decode()
    assert Configuration.objects.get(name=key).value == before
    assert not Event.objects.exists()


@pytest.mark.parametrize("model", ["hadash_configuration", "hadash_event", "hadash_hawork",
                                   "hadash_apitoken"])
def test_admin_search_with_nul_is_not_a_500(admin_client_, model):
    """Issue 8: a search for text no row can hold (NUL) finds nothing, not a 500."""
    world()
    r = admin_client_.get(reverse(f"admin:{model}_changelist"), {"q": "a\x00b"})
    assert r.status_code == 200
