"""HA status of VMs (SPEC R17): every code, and every waiting cause the engine has
today, reached through the real engine on a simulated fleet with virtual time
(fleet.testing.world); the causes that come with issue 11 (order, anti-affinity,
disarmed, observed) at the function level. Also the bulk helper's fixed number of
queries and the API's `ha_status` (list and detail)."""

from __future__ import annotations

import datetime as dt

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from fleet.testing import world
from hadash import config
from hadash.choices import Reason, Step, WaitCause, WorkType
from hadash.ha import actions, work
from hadash.models import ApiToken, HaWork
from hosts.models import Host
from vms import hastatus
from vms.models import VMInstance

pytestmark = pytest.mark.django_db

TWO_HOSTS = {"hosts": {"h1": {}, "h2": {}}, "vms": {"vm1": {"host": "h1", "ha": True}}}


def vm(name):
    return VMInstance.objects.select_related("host", "last_host").get(name=name)


def status(w, name, **kw):
    return hastatus.status_of(vm(name), now=w.clock.now(), **kw)


def item_of(name):
    return HaWork.objects.filter(instance__name=name, type=WorkType.HA).order_by("-id").first()


# --- protected, at-risk, unprotected ---------------------------------------------------

def test_r17_running_ha_vm_on_fenceable_host_is_protected():
    """R17: Running, HA-enabled, fits in the plan, host has a working BMC → protected."""
    w = world(TWO_HOSTS)
    w.advance_to(5)
    s = hastatus.statuses_for([vm("vm1")], now=w.clock.now(), unfit=set(), bmc_failing={})
    s = s[vm("vm1").pk]
    assert s.code == "protected"
    assert "fits" in s.reason and s.next_try is None
    assert s.since is not None


def test_r17_r22_vm_that_would_not_fit_is_at_risk_and_says_why():
    """R17/R22: the failover plan's unfit set makes a Running HA VM at-risk, with its
    size and host in the reason."""
    w = world({"hosts": {"h1": {}, "h2": {}},
               "vms": {"vm1": {"host": "h1", "ha": True, "cpus": 3, "memory_mb": 4096}}})
    v = vm("vm1")
    s = hastatus.statuses_for([v], now=w.clock.now(), unfit={v.pk}, bmc_failing={})[v.pk]
    assert s.code == "at-risk"
    assert "would not fit if h1 failed" in s.reason and "3 cpus / 4096 MB" in s.reason


def test_r17_r28_host_without_bmc_or_failing_check_makes_its_vms_at_risk():
    """R17/R28: a host that cannot be fenced (no BMC configured, or its BMC check
    failing) makes its HA VMs at-risk; the reason names which."""
    w = world(TWO_HOSTS)
    v = vm("vm1")
    failing = hastatus.statuses_for([v], now=w.clock.now(), unfit=set(),
                                    bmc_failing={v.host_id: "credentials refused"})[v.pk]
    assert failing.code == "at-risk" and "credentials refused" in failing.reason
    Host.objects.filter(name="h1").update(oobm_enabled=False)
    s = hastatus.statuses_for([vm("vm1")], now=w.clock.now(), unfit=set())[v.pk]
    assert s.code == "at-risk" and "no BMC configured" in s.reason


def test_r28_open_bmc_check_alert_is_read_by_the_bulk_helper():
    """R28: an open `bmc-check-failed` alert for the host is what the page's statuses
    read; resolved, the VM is protected again."""
    from django.db import transaction

    from hadash.alerts import open_alert, resolve_alert
    from hosts.hastatus import BMC_CHECK_ALERT

    w = world(TWO_HOSTS)
    now = w.clock.now()
    with transaction.atomic():
        open_alert(BMC_CHECK_ALERT, "host", "h1", now=now, title="BMC h1: no answer")
    assert status(w, "vm1", unfit=set()).code == "at-risk"
    assert "BMC h1: no answer" in status(w, "vm1", unfit=set()).reason
    with transaction.atomic():
        resolve_alert(BMC_CHECK_ALERT, "host", "h1", now=now)
    assert status(w, "vm1", unfit=set()).code == "protected"


def test_r17_not_ha_enabled_is_unprotected_unless_force_ha():
    """R17: not HA-enabled → unprotected; force.ha makes it protected; vm.ha.enabled
    off makes every VM unprotected and says so."""
    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {"plain": {"host": "h1"}}})
    assert status(w, "plain", unfit=set()).code == "unprotected"
    config.set_value("force.ha", "true")
    s = status(w, "plain", unfit=set())
    assert s.code == "protected" and "force.ha" in s.reason
    config.set_value("vm.ha.enabled", "false")
    s = status(w, "plain", unfit=set())
    assert s.code == "unprotected" and "vm.ha.enabled" in s.reason


def test_r17_vm_on_a_host_behind_on_ping_says_so_before_the_host_is_declared():
    """R17: while its host is behind on ping but not declared (suspect/investigating),
    a Running HA VM keeps its code and its reason says the host is behind."""
    w = world({**TWO_HOSTS, "config": {"ha.investigators.order": "CheckOnAgent,OutOfBand"}})
    w.apply("host h1 network off")
    w.apply("bmc h1 fail")
    w.advance_to(60)
    assert Host.objects.get(name="h1").status == "Up"
    s = hastatus.statuses_for([vm("vm1")], now=w.clock.now(), unfit=set(),
                              bmc_failing={})[vm("vm1").pk]
    assert s.code == "protected"
    assert "host h1 behind on ping for" in s.reason


# --- recovering, stopped, failed ------------------------------------------------------

def test_r17_unfinished_item_is_recovering_with_its_step():
    """R17: an unfinished HA item that does not wait → recovering, naming its step."""
    w = world(TWO_HOSTS)
    item = work.schedule_restart(vm("vm1"), investigate=True, reason=Reason.OPERATOR,
                                 now=w.clock.now())
    s = status(w, "vm1")
    assert s.code == "recovering"
    assert f"#{item.pk}" in s.reason and "Investigating" in s.reason


def test_r17_operator_stop_is_stopped():
    """R17: a VM an operator stopped is `stopped`, not failed or waiting."""
    w = world(TWO_HOSTS)
    actions.stop_vm(vm("vm1"), now=w.clock.now(), by="alice")
    w.advance_to(2)
    s = status(w, "vm1")
    assert s.code == "stopped" and "Stopped" in s.reason
    assert s.since is not None and s.since <= w.clock.now()


def test_r17_non_ha_vm_of_failed_host_is_stopped_and_says_why():
    """R17/R12.4: a non-HA VM of a failed host ends Stopped: its status says it was a
    failure and why it was not restarted."""
    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {"plain": {"host": "h1"}}})
    w.fleet.power_off("h1")
    w.advance_to(60)
    s = status(w, "plain")
    assert s.code == "stopped"
    assert "not HA-enabled" in s.reason and "h1" in s.reason


def test_r17_ha_gave_up_is_failed_until_the_vm_runs_again():
    """R17: the latest HA item ended in Error → failed, with its last error."""
    w = world({**TWO_HOSTS, "config": {"restart.retry.interval": 5,
                                       "vm.ha.migration.max.retries": 2}})
    w.fleet.start_fail("h2", 10)
    w.fleet.power_off("h1")
    w.advance_to(120)
    assert item_of("vm1").step == Step.ERROR
    s = status(w, "vm1")
    assert s.code == "failed" and "gave up" in s.reason


# --- waiting, through the engine ------------------------------------------------------

def test_r17_host_in_alert_without_item_is_waiting_host_unreachable():
    """R17: its host's agent stops but the host is alive → Alert; the HA VM waits with
    cause host-unreachable and the next investigation as next_try."""
    w = world(TWO_HOSTS)
    w.apply("host h1 agent stop")
    w.advance_to(40)
    h1 = Host.objects.get(name="h1")
    assert h1.status == "Alert" and item_of("vm1") is None
    s = status(w, "vm1")
    assert (s.code, s.cause) == ("waiting", WaitCause.HOST_UNREACHABLE)
    assert s.next_try == h1.next_investigation and "h1" in s.reason
    assert s.as_dict()["cause"] == "host-unreachable"


def test_r17_r13_no_capacity_is_waiting_no_capacity():
    """R17/R13: no host has room → waiting, cause no-capacity, next_try = the retry."""
    w = world({"hosts": {"h1": {"cpus": 2}, "h2": {"cpus": 2}},
               "vms": {"vm1": {"host": "h1", "ha": True, "cpus": 2},
                       "big": {"host": "h2", "cpus": 2}},
               "config": {"restart.retry.interval": 100}})
    w.fleet.power_off("h1")
    w.advance_to(60)
    item = item_of("vm1")
    s = status(w, "vm1")
    assert (s.code, s.cause) == ("waiting", WaitCause.NO_CAPACITY)
    assert s.next_try == item.time_to_try and s.next_try > w.clock.now()
    assert "needs 2 cpus" in s.reason and "next" in s.reason


def test_r17_r14_brake_is_waiting_braked():
    """R17/R14: two of three hosts down → brake; their HA VMs wait with cause braked."""
    w = world({"hosts": {"h1": {}, "h2": {}, "h3": {}},
               "vms": {"vm1": {"host": "h1", "ha": True}, "vm2": {"host": "h2", "ha": True}},
               "config": {"investigate.retry.interval": 20}})
    w.fleet.power_off("h1")
    w.fleet.power_off("h2")
    w.advance_to(80)
    for name in ("vm1", "vm2"):
        s = status(w, name)
        assert (s.code, s.cause) == ("waiting", WaitCause.BRAKED)
        assert s.next_try is not None


def test_r17_r12_failed_start_is_waiting_backoff_with_try_count():
    """R17/R12.5: a failed start → waiting, cause backoff, `try n of m`."""
    w = world({**TWO_HOSTS, "config": {"restart.retry.interval": 100}})
    w.fleet.start_fail("h2", 10)
    w.fleet.power_off("h1")
    w.advance_to(60)
    s = status(w, "vm1")
    assert (s.code, s.cause) == ("waiting", WaitCause.BACKOFF)
    assert "1 of 5" in s.reason
    assert s.next_try == item_of("vm1").time_to_try


def test_r17_r12_fencing_failure_is_waiting_fencing_failed():
    """R17/R12.2: the host cannot be fenced (BMC down) → waiting, cause fencing-failed;
    when the BMC is back the VM restarts and is no longer waiting."""
    w = world({**TWO_HOSTS, "config": {"restart.retry.interval": 30}})
    w.apply("host h1 network off")
    w.apply("bmc h1 fail")
    work.schedule_restart(vm("vm1"), investigate=True, reason=Reason.OPERATOR,
                          now=w.clock.now())
    w.advance_to(10)
    s = status(w, "vm1")
    assert (s.code, s.cause) == ("waiting", WaitCause.FENCING_FAILED)
    assert "h1" in s.reason
    w.apply("bmc h1 ok")
    w.advance_to(45)
    assert status(w, "vm1").code != "waiting"
    assert vm("vm1").state == "Running" and vm("vm1").host.name == "h2"


# --- waiting causes of issue 11, at the function level --------------------------------

@pytest.mark.parametrize("cause", [WaitCause.ORDER, WaitCause.ANTI_AFFINITY,
                                   WaitCause.DISARMED, WaitCause.OBSERVED])
def test_r17_r25_r26_issue_11_causes_are_shown_from_the_item(cause):
    """R17/R25/R26: order, anti-affinity, disarmed and observed come from the item's
    `waiting` (set by the engine with issue 11); the status shows cause, words and
    next try. Without a message the cause's own words are used."""
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    v = VMInstance(pk=7, name="v7", state="Stopped", ha_enabled=True)
    item = HaWork(pk=3, instance=v, type=WorkType.HA, step=Step.SCHEDULED, waiting=cause,
                  last_error="", time_to_try=now + dt.timedelta(seconds=30), created=now,
                  updated=now)
    cfg = {"vm.ha.enabled": True, "force.ha": False, "vm.ha.migration.max.retries": 5}
    s = hastatus.vm_status(v, now=now, cfg=cfg, item=item)
    assert (s.code, s.cause) == ("waiting", cause)
    assert s.reason.startswith(hastatus.CAUSE_WORDS[cause])
    assert s.as_dict()["next_try"] == "2026-01-01T00:00:30+00:00"


# --- the bulk helper and the API -------------------------------------------------------

def _fleet(n):
    hosts = {f"h{i}": {} for i in range(3)}
    vms = {f"v{i}": {"host": f"h{i % 3}", "ha": i % 2 == 0} for i in range(n)}
    return world({"hosts": hosts, "vms": vms})


def test_r17_bulk_statuses_cost_the_same_queries_for_3_or_30_vms():
    """R17: statuses for a page of VMs cost a fixed number of queries."""
    w = _fleet(30)
    w.fleet.power_off("h0")
    w.advance_to(60)
    counts = []
    for n in (3, 30):
        page = list(VMInstance.objects.order_by("name")[:n])
        with CaptureQueriesContext(connection) as q:
            out = hastatus.statuses_for(page, now=w.clock.now())
        assert len(out) == n
        counts.append(len(q))
    assert counts[0] == counts[1]


def test_r17_api_lists_and_shows_ha_status():
    """R17: GET /api/v1/vms and /api/v1/vms/{name} carry `ha_status` with code,
    reason, since and next_try; the list costs the same queries for 3 or 30 VMs."""
    w = _fleet(30)
    w.apply("host h1 agent stop")
    w.advance_to(40)
    _, key = ApiToken.issue(get_user_model().objects.create_user("viewer"))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    counts = []
    for n in (3, 30):
        with CaptureQueriesContext(connection) as q:
            r = client.get(f"/api/v1/vms?limit={n}")
        assert r.status_code == 200 and len(r.json()) == n
        counts.append(len(q))
    assert counts[0] == counts[1]
    by_name = {row["name"]: row["ha_status"] for row in r.json()}
    # v1 (not HA) and v4 (HA) are on h1, which is in Alert.
    assert by_name["v4"]["code"] == "waiting" and by_name["v4"]["cause"] == "host-unreachable"
    assert by_name["v1"]["code"] == "unprotected"
    assert set(by_name["v0"]) >= {"code", "reason", "since", "next_try"}
    one = client.get("/api/v1/vms/v4").json()["ha_status"]
    assert one == by_name["v4"]


def test_r17_template_tag_renders_a_list_of_vms_in_fixed_queries():
    """R17: `{% ha_statuses vms as s %}` + the include show each VM's code in a page
    that lists VMs (e.g. a host's VMs), the same queries for 3 or 30 VMs."""
    from django.template import Context, Template

    _fleet(30)
    tpl = Template('{% load dash hastatus %}{% ha_statuses vms as st %}{% for v in vms %}'
                   '[{{ v.name }}:{% include "dashboard/_ha_status.html" with '
                   'status=st|get:v.pk compact=1 %}]{% endfor %}')
    counts = []
    for n in (3, 30):
        page = list(VMInstance.objects.select_related("host").order_by("name")[:n])
        with CaptureQueriesContext(connection) as q:
            out = tpl.render(Context({"vms": page}))
        counts.append(len(q))
        assert out.count('data-ha-status="') == n
    assert counts[0] == counts[1]
    assert '[v1:<span class="ha-status hs-unprotected"' in out
    assert 'class="hs-reason"' not in out  # compact: the reason is the tooltip


# --- the list's HA status filter: a queryset per code ----------------------------------

def assert_filter_matches_statuses(w, *, unfit=hastatus.UNSET):
    """For every R17 code, filter_code's rows are exactly the VMs whose computed
    status has that code (and every VM has one of the codes)."""
    now = w.clock.now()
    cfg = config.snapshot()
    vms = list(VMInstance.objects.select_related("host", "last_host"))
    computed = hastatus.statuses_for(vms, now=now, cfg=cfg, unfit=unfit)
    seen = set()
    for code in hastatus.CODES:
        rows = set(hastatus.filter_code(VMInstance.objects.all(), code, now=now, cfg=cfg,
                                        unfit=unfit).values_list("name", flat=True))
        want = {v.name for v in vms if computed[v.pk].code == code}
        assert rows == want, (code, sorted(rows), sorted(want))
        seen |= rows
    assert seen == {v.name for v in vms}
    return {v.name: computed[v.pk].code for v in vms}


def test_r17_filter_code_selects_exactly_the_vms_with_each_code():
    """R17 (issue 10 item 6): the VM list's HA status filter selects in the database
    exactly the VMs whose status shows that code, through a failed host's story: VMs
    restarting, waiting for room, left Stopped without HA, stopped by an operator, on a
    host without BMC, on a host whose BMC check fails, on a host in Alert, unfit in the
    failover plan, on no host at all; then force.ha and vm.ha.enabled off."""
    from django.db import transaction

    from hadash.alerts import open_alert
    from hosts.hastatus import BMC_CHECK_ALERT

    w = world({"hosts": {"h1": {"cpus": 8}, "h2": {"cpus": 4}, "h3": {"cpus": 4},
                         "h4": {"cpus": 4}, "h5": {"cpus": 4}},
               "vms": {"small": {"host": "h1", "ha": True, "cpus": 1},
                       "huge": {"host": "h1", "ha": True, "cpus": 6},
                       "plain": {"host": "h1", "cpus": 1},
                       "idle": {"host": "h2", "ha": True, "cpus": 1},
                       "fits": {"host": "h2", "ha": True, "cpus": 1},
                       "tight": {"host": "h2", "ha": True, "cpus": 1},
                       "nobmc": {"host": "h3", "ha": True, "cpus": 1},
                       "badbmc": {"host": "h4", "ha": True, "cpus": 1},
                       "cut": {"host": "h5", "ha": True, "cpus": 1},
                       "cut-plain": {"host": "h5", "cpus": 1}},
               "config": {"restart.retry.interval": 300}})
    Host.objects.filter(name="h3").update(oobm_enabled=False)
    with transaction.atomic():
        open_alert(BMC_CHECK_ALERT, "host", "h4", now=w.clock.now(), title="BMC h4: no answer")
    VMInstance.objects.create(name="homeless", state="Stopped", ha_enabled=True)
    unfit = {vm("tight").pk}
    actions.stop_vm(vm("idle"), now=w.clock.now(), by="alice")
    w.advance_to(2)
    codes = assert_filter_matches_statuses(w, unfit=unfit)
    assert {codes["fits"], codes["nobmc"], codes["badbmc"], codes["tight"],
            codes["plain"], codes["idle"]} == {"protected", "at-risk", "unprotected",
                                                "stopped"}
    assert codes["tight"] == codes["nobmc"] == codes["badbmc"] == "at-risk"
    assert_filter_matches_statuses(w, unfit=None)  # no failover plan stored yet
    assert_filter_matches_statuses(w)  # read from the (empty) plans
    w.fleet.power_off("h1")
    w.apply("host h5 agent stop")
    seen = set()
    for t in range(5, 90, 5):
        w.advance_to(t)
        seen |= set(assert_filter_matches_statuses(w, unfit=unfit).values())
    assert {"waiting", "stopped", "at-risk", "protected", "unprotected"} <= seen
    work.schedule_restart(vm("fits"), investigate=True, reason=Reason.OPERATOR,
                          now=w.clock.now())
    assert assert_filter_matches_statuses(w, unfit=unfit)["fits"] == "recovering"
    config.set_value("force.ha", "true")
    assert_filter_matches_statuses(w, unfit=unfit)
    config.set_value("vm.ha.enabled", "false")
    assert_filter_matches_statuses(w, unfit=unfit)


def test_r17_filter_code_finds_failed_and_observed_vms():
    """R17: HA gave up (latest HA item in Error) → `failed` in the filter as in the
    column, until the VM runs again; an observe-mode item (R26) → `waiting`; a VM in
    state Error → `failed`; an unknown code selects nothing."""
    w = world({**TWO_HOSTS, "config": {"restart.retry.interval": 5,
                                       "vm.ha.migration.max.retries": 2}})
    VMInstance.objects.create(name="broken", host=Host.objects.get(name="h2"),
                              state="Error", ha_enabled=True)
    w.fleet.start_fail("h2", 10)
    w.fleet.power_off("h1")
    w.advance_to(120)
    assert item_of("vm1").step == Step.ERROR
    codes = assert_filter_matches_statuses(w, unfit=set())
    assert codes["vm1"] == codes["broken"] == "failed"
    now = w.clock.now()
    v = vm("vm1")
    HaWork.objects.create(instance=v, vm_type=v.type, type=WorkType.HA,
                          reason=Reason.OBSERVED, step=Step.DONE, state=v.state,
                          update_count=v.update_count, time_to_try=now, created=now,
                          updated=now)
    assert assert_filter_matches_statuses(w, unfit=set())["vm1"] == "waiting"
    assert not hastatus.filter_code(VMInstance.objects.all(), "bogus", now=now).exists()
