"""Incidents and alerts in the engine (SPEC R18, R19; R17 waiting causes; R21 counters),
driven through the real engine on a simulated fleet with virtual time
(fleet.testing.world): what an operator sees in the incident and alert tables."""

import pytest

from fleet.testing import world
from hadash.choices import Reason, Step
from hadash.ha import actions, work
from hadash.models import Alert, Event, HaWork, Incident, IncidentVm
from metrics.counters import totals
from vms.models import VMInstance

pytestmark = pytest.mark.django_db

HOST_FAILS = {
    "hosts": {"h1": {}, "h2": {}, "h3": {}},
    "vms": {"vm1": {"host": "h1", "ha": True}, "vm2": {"host": "h1"},
            "vm3": {"host": "h2", "ha": True}},
}


def vm(name):
    return VMInstance.objects.select_related("host").get(name=name)


def t(w, seconds):
    """The virtual time ``seconds`` after the world's start."""
    import datetime as dt

    return w.clock.epoch + dt.timedelta(seconds=seconds)


# --- R18/R19: a host failure -----------------------------------------------------------

def test_r18_r19_host_power_loss_is_one_incident_with_one_alert_resolved_by_itself():
    """R18/R19: a host that loses power is one incident (behind on ping → declared →
    resolved), with exactly one alert that ends resolved by itself; the HA restart is
    an info event of the incident, never an alert of its own; the incident records
    when each step happened and which VMs were affected and restarted."""
    w = world(HOST_FAILS)
    w.advance_to(15)  # last ping at t=10
    w.fleet.power_off("h1")
    w.advance_to(120)
    [inc] = Incident.objects.all()
    assert (inc.kind, inc.host_name, inc.state) == ("host", "h1", "Resolved")
    assert inc.started_at == t(w, 10)  # the last ping, not the detection
    assert t(w, 10) < inc.detected_at <= inc.declared_at <= inc.first_restart_at
    assert inc.first_restart_at == inc.last_restart_at <= inc.resolved_at
    assert (inc.vms_affected, inc.vms_restarted, inc.vms_failed) == (1, 1, 0)
    [alert] = Alert.objects.all()
    assert alert.incident == inc and alert.state == "resolved"
    assert alert.severity == "critical" and alert.resolved_at == inc.resolved_at
    assert "1 of 1 HA VM(s) running again" in alert.message
    # The restart: an info event of the incident; no event flagged as an alert.
    started = Event.objects.get(event="HaStarted")
    assert (started.severity, started.alert, started.incident) == ("info", False, inc)
    assert not Event.objects.filter(alert=True).exclude(event="AlertOpened").exists()
    assert Event.objects.filter(event="AlertOpened").count() == 1
    assert Event.objects.filter(event="AlertResolved").count() == 1
    # Its events and HA items link to it.
    for name in ("PingTimeout", "HostDown", "HaScheduled"):
        assert Event.objects.get(event=name, host__name="h1").incident == inc, name
    assert set(HaWork.objects.values_list("incident", flat=True)) == {inc.pk}
    # VM on another host: no part of it.
    assert not IncidentVm.objects.filter(vm_name="vm3").exists()


def test_r18_downtime_is_last_confirmation_to_running_again():
    """R18: a VM's downtime runs from its last confirmation (the host's last ping or
    the VM's power report, whichever is later) to Running again — not from detection."""
    w = world(HOST_FAILS)
    w.advance_to(15)
    w.fleet.power_off("h1")
    w.advance_to(120)
    rows = {r.vm_name: r for r in IncidentVm.objects.all()}
    assert set(rows) == {"vm1", "vm2"}
    ha = rows["vm1"]
    assert (ha.ha, ha.outcome, ha.target_host_name) == (True, "restarted", vm("vm1").host.name)
    assert ha.down_since == t(w, 10)
    started = Event.objects.get(event="HaStarted")
    assert ha.running_at == started.time
    assert ha.downtime == (started.time - t(w, 10)).total_seconds()
    assert ha.downtime > (started.time - Incident.objects.get().detected_at).total_seconds()
    plain = rows["vm2"]
    assert (plain.ha, plain.outcome, plain.running_at) == (False, "not-ha", None)


def test_r18_ha_gives_up_incident_failed_and_its_alert_resolved_as_failed():
    """R18/R19: when HA gives up on a VM, the incident ends Failed and its one alert is
    resolved (notified as failed); the item's Error raises no second alert."""
    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {"vm1": {"host": "h1", "ha": True}},
               "config": {"restart.retry.interval": 5, "vm.ha.migration.max.retries": 2}})
    w.fleet.start_fail("h2", 10)
    w.fleet.power_off("h1")
    w.advance_to(120)
    [inc] = Incident.objects.all()
    assert (inc.state, inc.vms_failed, inc.vms_restarted) == ("Failed", 1, 0)
    assert IncidentVm.objects.get(vm_name="vm1").outcome == "failed"
    [alert] = Alert.objects.all()
    assert alert.state == "resolved" and "gave up" in alert.message


def test_r18_host_with_no_ha_vm_is_resolved_at_declaration():
    """R18: a host Down with no HA VM has nothing to recover: Resolved when declared."""
    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {"plain": {"host": "h1"}}})
    w.fleet.power_off("h1")
    w.advance_to(60)
    [inc] = Incident.objects.all()
    assert inc.state == "Resolved" and inc.resolved_at == inc.declared_at
    assert inc.vms_affected == 0
    assert Alert.objects.get().state == "resolved"


# --- R18: dismissal ---------------------------------------------------------------------

def test_r18_host_in_alert_keeps_its_incident_open_then_dismissed_when_back():
    """R18/R19: an agent that stops: the host goes Alert, its incident stays Open with
    its alert saying nothing is restarted; when the agent is back the incident is
    Dismissed (nothing was done) and the alert resolved."""
    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {"vm1": {"host": "h1", "ha": True}}})
    w.advance_to(5)
    w.apply("host h1 agent stop")
    w.advance_to(60)
    [inc] = Incident.objects.all()
    assert inc.state == "Open" and inc.declared_at is None
    alert = Alert.objects.get()
    assert alert.state == "open" and "its VMs are not restarted" in alert.title
    w.apply("host h1 agent start")  # the agent connects again
    w.advance_to(62)
    inc.refresh_from_db()
    alert.refresh_from_db()
    assert inc.state == "Dismissed" and inc.resolved_at is not None
    assert alert.state == "resolved" and "nothing was done" in alert.message
    assert not HaWork.objects.exists()


def test_r18_host_on_time_again_without_status_change_is_dismissed_by_the_sweep():
    """R18: a host found behind on ping whose fate is undeterminable stays Up; when its
    pings resume (no status change, so no hook) the next sweep dismisses its incident."""
    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {"vm1": {"host": "h1", "ha": True}},
               "config": {"ha.investigators.order": "CheckOnAgent,OutOfBand",
                          "alert.wait": 600}})
    w.advance_to(5)
    w.apply("host h1 network off")
    w.advance_to(40)
    [inc] = Incident.objects.all()
    assert inc.state == "Open"
    assert vm("vm1").state == "Running"
    w.apply("host h1 network on")
    w.advance_to(51)  # the ping at t=50, then a sweep
    inc.refresh_from_db()
    assert inc.state == "Dismissed"
    assert Alert.objects.get().state == "resolved"


# --- R18: VM incidents -----------------------------------------------------------------

def test_r18_vm_crash_is_a_vm_incident_resolved_when_running_again():
    """R18: a VM that powers off while Running opens a VM incident from its last power
    confirmation, resolved when HA has it Running again; one alert, resolved; a non-HA
    VM that crashes is only marked Stopped (no incident, no alert)."""
    w = world({"hosts": {"h1": {}, "h2": {}},
               "vms": {"vm1": {"host": "h1", "ha": True}, "vm2": {"host": "h1"}}})
    w.advance_to(25)  # confirmed by the ping at t=20
    w.fleet.vm_crash("vm1")
    w.fleet.vm_crash("vm2")
    w.advance_to(90)
    [inc] = Incident.objects.all()
    assert (inc.kind, inc.vm_name, inc.state) == ("vm", "vm1", "Resolved")
    assert inc.started_at == t(w, 20) and inc.detected_at == t(w, 30)
    [row] = inc.vms.all()
    assert row.outcome == "restarted" and row.down_since == t(w, 20)
    assert row.running_at == inc.resolved_at
    assert HaWork.objects.get(instance__name="vm1").incident == inc
    [alert] = Alert.objects.all()
    assert alert.incident == inc and alert.state == "resolved"
    assert vm("vm2").state == "Stopped"


# --- R19: other alerts --------------------------------------------------------------------

def test_r19_work_error_outside_an_incident_alerts_once_and_resolves_on_a_later_done():
    """R19: an HA item not tied to an incident (an operator's) that gives up raises one
    alert for the VM (kind per type); a later item for the VM that finishes Done
    resolves it."""
    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {"vm1": {"host": "h1", "ha": True}},
               "config": {"restart.retry.interval": 5, "vm.ha.migration.max.retries": 2}})
    w.fleet.start_fail("h1", 10)
    w.fleet.start_fail("h2", 10)
    work.schedule_restart(vm("vm1"), investigate=False, reason=Reason.OPERATOR,
                          now=w.clock.now())
    w.advance_to(60)
    assert HaWork.objects.get().step == Step.ERROR
    alert = Alert.objects.get()
    assert (alert.kind, alert.subject_name, alert.state) == ("HaGaveUp", "vm1", "open")
    assert not Incident.objects.exists()
    w.fleet.start_fail("h1", 0)
    w.fleet.start_fail("h2", 0)
    work.schedule_restart(vm("vm1"), investigate=False, reason=Reason.OPERATOR,
                          now=w.clock.now())
    w.advance_to(62)
    assert vm("vm1").state == "Running"
    alert.refresh_from_db()
    assert alert.state == "resolved"
    assert Alert.objects.count() == 1


def test_r19_brake_is_one_alert_per_cluster_resolved_on_release():
    """R19: the mass-failure brake is one alert for its cluster while engaged (however
    many items wait on it), resolved when the brake is released."""
    w = world({"hosts": {"h1": {}, "h2": {}, "h3": {}},
               "vms": {"vm1": {"host": "h1", "ha": True}, "vm2": {"host": "h2", "ha": True}},
               "config": {"investigate.retry.interval": 20}})
    w.fleet.power_off("h1")
    w.fleet.power_off("h2")
    w.advance_to(120)
    brake = Alert.objects.filter(kind="BrakeEngaged")
    assert [(a.subject_name, a.state) for a in brake] == [("c1", "open")]
    w.apply("config ha.max.hosts.down.ratio 1.0")
    w.advance_to(122)
    assert [a.state for a in brake.all()] == ["resolved"]
    assert Alert.objects.filter(state="open").count() == 0  # incidents done too


# --- R17: why an item waits ---------------------------------------------------------------

def test_r17_waiting_no_capacity_names_the_need_and_the_best_host():
    """R17: an HA item that finds no room waits no-capacity, saying what it needs and
    what the best host has; it is no longer waiting once it moves on."""
    w = world({"hosts": {"h1": {}, "h2": {"cpus": 2, "memory_mb": 4096}},
               "vms": {"big": {"host": "h1", "ha": True, "cpus": 4, "memory_mb": 8192}},
               "config": {"restart.retry.interval": 30}})
    w.fleet.power_off("h1")
    w.advance_to(60)
    item = HaWork.objects.get()
    assert item.waiting == "no-capacity"
    assert "needs 4 cpus / 8192 MB; best host h2 has 2 cpus / 4096 MB free" in item.last_error
    # Room appears (the VM shrinks): it starts, and no longer waits.
    VMInstance.objects.filter(name="big").update(cpus=1, memory_mb=1024)
    w.advance_to(100)
    item.refresh_from_db()
    assert item.step == Step.DONE and item.waiting == ""


def test_r17_waiting_backoff_says_try_n_of_m():
    """R17: a failed start waits backoff: "try 1 of 3, next at …"."""
    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {"vm1": {"host": "h1", "ha": True}},
               "config": {"restart.retry.interval": 600, "vm.ha.migration.max.retries": 3}})
    w.fleet.start_fail("h2", 10)
    w.fleet.power_off("h1")
    w.advance_to(60)
    item = HaWork.objects.get()
    assert item.waiting == "backoff" and "try 1 of 3, next at" in item.last_error


def test_r17_waiting_host_unreachable_when_the_vm_is_alive_on_an_alert_host():
    """R17: an item whose VM is alive on a host that is not Up waits host-unreachable:
    nothing is restarted while the VM may run."""
    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {"vm1": {"host": "h1", "ha": True}}})
    w.advance_to(5)
    w.apply("host h1 agent stop")
    w.advance_to(40)  # h1 in Alert: alive, not talking
    item = work.schedule_restart(vm("vm1"), investigate=True, reason=Reason.OPERATOR,
                                 now=w.clock.now())
    w.fleet.agent_start("h1")  # it answers questions again, but has not pinged yet
    w.advance_to(41)
    item.refresh_from_db()
    assert item.step == Step.INVESTIGATING
    assert item.waiting == "host-unreachable" and "h1 is Alert" in item.last_error
    assert w.fleet.where("vm1") == ["h1"]


# --- R21: counters ------------------------------------------------------------------------

def test_r21_fences_and_restarts_are_counted_with_their_outcome():
    """R21: a fence and an HA restart are counted (with their outcome) in the
    transactions that record them."""
    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {"vm1": {"host": "h1", "ha": True}}})
    w.apply("host h1 network off")
    work.schedule_restart(vm("vm1"), investigate=True, reason=Reason.OPERATOR,
                          now=w.clock.now())
    w.advance_to(2)
    got = totals()
    assert got[("fences", "outcome=ok")] == 1
    assert got[("restarts", "outcome=ok")] == 1
    assert Incident.objects.get(kind="host").fenced_at is not None


def test_r15a_operator_stop_settles_the_vm_of_an_open_incident():
    """R18: an operator stop cancels the VM's HA item (R15a); the VM is settled in its
    incident, which then ends instead of waiting forever."""
    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {"vm1": {"host": "h1", "ha": True}},
               "config": {"restart.retry.interval": 600}})
    w.fleet.start_fail("h2", 10)
    w.fleet.power_off("h1")
    w.advance_to(60)
    assert Incident.objects.get().state == "Recovering"
    actions.stop_vm(vm("vm1"), now=w.clock.now(), by="alice")
    inc = Incident.objects.get()
    assert inc.state == "Resolved"
    assert IncidentVm.objects.get(vm_name="vm1").outcome == "settled"
    assert Alert.objects.get().state == "resolved"


def test_r18_vm_gone_missing_is_a_vm_incident_from_its_last_confirmation():
    """R18 (R8): a VM the hypervisor forgets is missing once its power state is older
    than 2 × ping.interval; its VM incident starts at the last report that named it,
    and ends when HA has it Running again."""
    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {"vm1": {"host": "h1", "ha": True}}})
    w.advance_to(25)  # named by the ping at t=20
    w.fleet.vm_vanish("vm1")
    w.advance_to(120)
    [inc] = Incident.objects.all()
    assert (inc.kind, inc.state) == ("vm", "Resolved")
    assert inc.title == "vm1 went missing"
    assert inc.started_at == t(w, 20)
    assert inc.vms.get().down_since == t(w, 20)


def test_r19_lost_engine_loop_alert_resolves_when_a_replacement_registers():
    """R19: a lost engine loop is one alert (named after it), resolved by itself once
    as many loops are alive as the installation runs again (a replacement registered)."""
    import datetime as dt

    from django.utils import timezone

    from hadash.ha import runtime
    from hadash.models import EngineProcess

    now = timezone.now()
    EngineProcess.objects.create(id="box:42:abc", host="box", pid=42,
                                 started=now - dt.timedelta(minutes=5),
                                 heartbeat=now - dt.timedelta(minutes=1))
    assert runtime.reap_lost_loops(now) == ["box:42:abc"]
    alert = Alert.objects.get()
    assert (alert.kind, alert.subject_name, alert.state) == (
        "EngineLoopLost", "box:42:abc", "open")
    assert runtime.loops_back(now) == 0  # nobody alive yet: it stays open
    EngineProcess.objects.create(id="box:43:def", host="box", pid=43, started=now,
                                 heartbeat=now)
    assert runtime.loops_back(now) == 1
    alert.refresh_from_db()
    assert alert.state == "resolved"


def test_r18_r20_late_pings_of_a_host_whose_agent_answers_page_no_one():
    """R18/R20 (operator trial): after the management server itself was down, every
    host is behind on ping at the first sweep — pings went unread, the hosts are fine.
    A host whose agent answers the health check is only a PingTimeout event: no
    incident, no alert, so no notification; one that does not answer opens one."""
    import datetime as dt

    from hosts.models import Host

    w = world(HOST_FAILS)
    w.advance_to(15)
    # Nobody read h1's and h2's pings for two minutes (the server was down).
    Host.objects.filter(name__in=["h1", "h2"]).update(
        last_ping=t(w, 15) - dt.timedelta(seconds=120))
    w.fleet.power_off("h2")  # h2 really is gone
    w.advance_to(17)
    assert Event.objects.filter(event="PingTimeout", subject_name="h1").exists()
    assert not Incident.objects.filter(host_name="h1").exists()
    assert not Alert.objects.filter(subject_name="h1").exists()
    [inc] = Incident.objects.filter(host_name="h2")
    assert inc.detected_at <= t(w, 17)
    assert Event.objects.get(event="PingTimeout", subject_name="h2").incident == inc
    assert Alert.objects.filter(incident=inc).count() == 1
