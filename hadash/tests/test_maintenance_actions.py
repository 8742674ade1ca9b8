"""Maintenance (SPEC R15) and operator stops (R15a), driven through the operator actions
(hadash.ha.actions, which the API, admin, dashboard and scenarios call) and the real
engine on a simulated fleet with virtual time (fleet.testing.world)."""

import datetime as dt

import pytest

from fleet.testing import world
from hadash import config
from hadash.choices import Reason, Step, WorkType
from hadash.ha import actions, work, worker
from hadash.models import Alert, Event, HaWork
from hosts.models import Host
from vms.models import VMInstance

pytestmark = pytest.mark.django_db


def vm(name):
    return VMInstance.objects.select_related("host").get(name=name)


def host(name):
    return Host.objects.get(name=name)


def items(name, type=WorkType.HA):
    return list(HaWork.objects.filter(instance__name=name, type=type).order_by("id"))


def restarts(name):
    return Event.objects.filter(vm__name=name, event="HaStarted").count()


def migrations(w):
    return [c for c in w.fleet.calls if c[0] == "migrate"]


def resource_states(name):
    """The host's resource_state changes, oldest first, as (old, new)."""
    return list(Event.objects.filter(subject_name=name, field="resource_state")
                .order_by("id").values_list("old", "new"))


def maintenance_alerts(name):
    """R19: the host's ErrorInMaintenance alerts, as states."""
    return list(Alert.objects.filter(kind="ErrorInMaintenance", subject_name=name)
                .values_list("state", flat=True))


# h1 is emptied for maintenance; h2 is full until `filler` stops.
NO_ROOM = {
    "config": {"migrate.retry.interval": 60},
    "hosts": {"h1": {}, "h2": {"cpus": 4}},
    "vms": {"a": {"host": "h1", "cpus": 2}, "b": {"host": "h1", "cpus": 2},
            "filler": {"host": "h2", "cpus": 4}},
}


# --- R15: a failed migration → ErrorInMaintenance while retrying --------------------------

def test_r15_no_room_is_a_failed_migration_error_in_maintenance_while_retrying():
    """R15: "no host has room" leaves ErrorInMaintenance (one alert), the Migration work
    retries every migrate.retry.interval without counting tries, and once room appears
    the VMs migrate and the host is in Maintenance — from ErrorInMaintenance."""
    w = world(NO_ROOM)
    actions.prepare_maintenance(host("h1"), now=w.clock.now(), by="alice")
    w.advance_to(1)
    assert host("h1").resource_state == "ErrorInMaintenance"
    assert resource_states("h1") == [("Enabled", "PrepareForMaintenance"),
                                     ("PrepareForMaintenance", "ErrorInMaintenance")]
    assert maintenance_alerts("h1") == ["open"]
    for name in ("a", "b"):
        (item,) = items(name, WorkType.MIGRATION)
        assert item.step == Step.SCHEDULED and item.taken is None and item.tried == 0
        assert item.time_to_try == w.clock.epoch + dt.timedelta(seconds=60)
        assert "no host has room" in item.last_error
        assert vm(name).state == "Running" and vm(name).host.name == "h1"
    # Still no room at the retry: still ErrorInMaintenance, a second WorkRetry event,
    # no second alert, next try another 60 s later.
    w.advance_to(60)
    assert host("h1").resource_state == "ErrorInMaintenance"
    assert len(resource_states("h1")) == 2
    assert maintenance_alerts("h1") == ["open"]
    assert Event.objects.filter(event="WorkRetry", subject_name="a").count() == 2
    assert items("a", WorkType.MIGRATION)[0].time_to_try == \
        w.clock.epoch + dt.timedelta(seconds=120)
    # Room appears; nothing moves before the next try, then both VMs leave.
    w.apply("vm filler stop")
    w.advance_to(119)
    assert host("h1").resource_state == "ErrorInMaintenance" and migrations(w) == []
    w.advance_to(120)
    assert {vm("a").host.name, vm("b").host.name} == {"h2"}
    assert [i.step for i in items("a", WorkType.MIGRATION)] == [Step.DONE]
    assert host("h1").resource_state == "Maintenance"
    assert resource_states("h1")[-1] == ("ErrorInMaintenance", "Maintenance")
    assert maintenance_alerts("h1") == ["resolved"]  # R19: resolved in Maintenance
    assert w.fleet.double_runs() == {}


def test_r15_failed_migration_keeps_retrying_and_counts_its_tries():
    """R15: a migration the target refuses (here: unreachable) leaves ErrorInMaintenance;
    the work is not ended in Error but retried every migrate.retry.interval."""
    w = world({"config": {"migrate.retry.interval": 10, "vm.ha.migration.max.retries": 2},
               "hosts": {"h1": {}, "h2": {}}, "vms": {"a": {"host": "h1"}}})
    # h2 is still Up in the database (for 25 s), but cannot answer.
    w.fleet.network("h2", False)
    actions.prepare_maintenance(host("h1"), now=w.clock.now())
    w.advance_to(1)
    assert host("h1").resource_state == "ErrorInMaintenance"
    (item,) = items("a", WorkType.MIGRATION)
    assert (item.step, item.tried) == (Step.SCHEDULED, 1)
    assert vm("a").state == "Running" and vm("a").host.name == "h1"
    assert Event.objects.filter(vm__name="a", event="MigrationFailed").count() == 1
    w.advance_to(11)  # second failure: as many as vm.ha.migration.max.retries allows HA
    (item,) = items("a", WorkType.MIGRATION)
    assert (item.step, item.tried) == (Step.SCHEDULED, 2)
    assert host("h1").resource_state == "ErrorInMaintenance"
    assert host("h2").status == "Up"
    w.fleet.network("h2", True)
    w.advance_to(21)
    assert vm("a").host.name == "h2" and w.fleet.where("a") == ["h2"]
    assert items("a", WorkType.MIGRATION)[0].step == Step.DONE
    assert host("h1").resource_state == "Maintenance"


def test_r15_error_in_maintenance_host_is_in_maintenance_once_its_last_vm_left():
    """R15: once no VM is left on an ErrorInMaintenance host it is in Maintenance — here
    the last VM is stopped by an operator; its migration notices at its next try."""
    w = world({"config": {"migrate.retry.interval": 60},
               "hosts": {"h1": {}, "h2": {"cpus": 1}},
               "vms": {"a": {"host": "h1", "cpus": 2}}})
    actions.prepare_maintenance(host("h1"), now=w.clock.now())
    w.advance_to(10)
    assert host("h1").resource_state == "ErrorInMaintenance"
    w.apply("vm a stop")
    w.advance_to(11)
    assert vm("a").state == "Stopped"
    w.advance_to(60)
    assert host("h1").resource_state == "Maintenance"
    assert items("a", WorkType.MIGRATION)[0].step == Step.DONE
    assert migrations(w) == []


# --- R15: cancel-maintenance cancels pending migrations ---------------------------------------

def test_r15_cancel_maintenance_cancels_pending_migrations_each_with_its_event():
    w = world(NO_ROOM)
    actions.prepare_maintenance(host("h1"), now=w.clock.now())
    w.advance_to(10)
    assert host("h1").resource_state == "ErrorInMaintenance"
    actions.cancel_maintenance(host("h1"), now=w.clock.now(), by="alice")
    assert host("h1").resource_state == "Enabled"
    for name in ("a", "b"):
        (item,) = items(name, WorkType.MIGRATION)
        assert item.step == Step.CANCELLED and item.taken is None
        assert Event.objects.filter(subject_name=name, event="WorkStep",
                                    new=Step.CANCELLED).count() == 1
    # Room appears and the old retry time passes: nothing migrates, nothing new queued.
    w.apply("vm filler stop")
    w.advance_to(200)
    assert migrations(w) == []
    assert vm("a").host.name == "h1" and vm("b").host.name == "h1"
    assert len(items("a", WorkType.MIGRATION)) == 1
    assert host("h1").resource_state == "Enabled"


def test_r15_cancel_in_the_same_second_cancels_migrations_never_begun():
    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {"a": {"host": "h1"}}})
    actions.prepare_maintenance(host("h1"), now=w.clock.now())
    assert items("a", WorkType.MIGRATION)[0].step == Step.SCHEDULED
    actions.cancel_maintenance(host("h1"), now=w.clock.now())
    w.advance_to(30)
    assert items("a", WorkType.MIGRATION)[0].step == Step.CANCELLED
    assert vm("a").host.name == "h1" and migrations(w) == []


def test_r15_cancel_leaves_a_migration_a_live_worker_holds_to_that_worker():
    """A migration being carried out cannot be called back; the worker, finding the
    host Enabled, ends it (Cancelled before it began). A worker whose lease lapsed
    holds nothing: its item is cancelled at once."""
    w = world({"hosts": {"h1": {}, "h2": {}},
               "vms": {"a": {"host": "h1"}, "b": {"host": "h1"}}})
    actions.prepare_maintenance(host("h1"), now=w.clock.now())
    cfg = config.snapshot()
    held = work.claim(w.engine, cfg)
    assert held is not None and held.type == WorkType.MIGRATION
    other = HaWork.objects.exclude(pk=held.pk).get(type=WorkType.MIGRATION)
    HaWork.objects.filter(pk=other.pk).update(
        taken=w.clock.now() - work.WORK_LEASE - dt.timedelta(seconds=1), taken_by="dead")
    actions.cancel_maintenance(host("h1"), now=w.clock.now())
    assert HaWork.objects.get(pk=held.pk).step == Step.SCHEDULED  # still the worker's
    assert HaWork.objects.get(pk=other.pk).step == Step.CANCELLED
    worker.process(w.engine, held, cfg)
    held.refresh_from_db()
    assert held.step == Step.CANCELLED and held.taken is None
    assert migrations(w) == []


def test_r15_refused_maintenance_actions_change_nothing():
    w = world({"hosts": {"h1": {}, "h2": {}}})
    before = Event.objects.count()
    with pytest.raises(actions.ActionError, match="not in maintenance"):
        actions.cancel_maintenance(host("h1"), now=w.clock.now())
    actions.prepare_maintenance(host("h1"), now=w.clock.now())
    assert host("h1").resource_state == "Maintenance"
    after = Event.objects.count()
    with pytest.raises(actions.ActionError, match="already Maintenance"):
        actions.prepare_maintenance(host("h1"), now=w.clock.now())
    assert before < after == Event.objects.count()


# --- R15a: an operator stop cancels the VM's unfinished HA item -------------------------------

WAITING_FOR_ROOM = {
    "config": {"restart.retry.interval": 30},
    "hosts": {"h1": {"cpus": 4, "memory_mb": 8192}, "h2": {"cpus": 4, "memory_mb": 8192}},
    "vms": {"vm1": {"host": "h1", "ha": True, "cpus": 4, "memory_mb": 4096},
            "big": {"host": "h2", "cpus": 4, "memory_mb": 4096}},
}


def test_r15a_stop_of_a_stopped_vm_waiting_for_ha_cancels_the_item_and_it_is_never_restarted():
    w = world(WAITING_FOR_ROOM)
    w.apply("host h1 power off")
    w.advance_to(140)
    (item,) = items("vm1")
    assert item.step == Step.SCHEDULED and vm("vm1").state == "Stopped"
    got = actions.stop_vm(vm("vm1"), now=w.clock.now(), by="alice")
    assert got.pk == item.pk
    item.refresh_from_db()
    assert item.step == Step.CANCELLED and item.taken is None
    ev = Event.objects.get(subject_name="vm1", event="WorkStep", new=Step.CANCELLED)
    assert "alice" in ev.message
    assert items("vm1", WorkType.STOP) == []  # nothing to stop: it is Stopped already
    w.apply("vm big stop")  # room appears
    w.advance_to(600)
    assert vm("vm1").state == "Stopped" and restarts("vm1") == 0
    assert [i.step for i in items("vm1")] == [Step.CANCELLED]
    assert not any(c[0] == "start" and c[2] == "vm1" for c in w.fleet.calls)


def test_r15a_stop_of_a_running_vm_cancels_its_investigation_and_stops_it():
    """Whatever the VM's state: here Running, with an HA item still investigating."""
    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {"vm1": {"host": "h1", "ha": True}}})
    now = w.clock.now()
    ha = work.schedule_restart(vm("vm1"), investigate=True, reason=Reason.VM_POWER_OFF, now=now)
    HaWork.objects.filter(pk=ha.pk).update(time_to_try=now + dt.timedelta(seconds=60))
    stop = actions.stop_vm(vm("vm1"), now=now, by="alice")
    assert stop.type == WorkType.STOP
    ha.refresh_from_db()
    assert ha.step == Step.CANCELLED
    w.advance_to(200)
    assert vm("vm1").state == "Stopped" and w.fleet.where("vm1") == []
    assert restarts("vm1") == 0 and [i.step for i in items("vm1")] == [Step.CANCELLED]
    assert [i.step for i in items("vm1", WorkType.STOP)] == [Step.DONE]


def test_r15a_stop_cancels_an_item_a_worker_holds_and_the_worker_drops_its_result():
    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {"vm1": {"host": "h1", "ha": True}}})
    now = w.clock.now()
    work.schedule_restart(vm("vm1"), investigate=True, reason=Reason.VM_POWER_OFF, now=now)
    cfg = config.snapshot()
    held = work.claim(w.engine, cfg)
    assert held is not None and held.type == WorkType.HA
    actions.stop_vm(vm("vm1"), now=now)
    worker.process(w.engine, held, cfg)  # the worker finds the item no longer its own
    held.refresh_from_db()
    assert held.step == Step.CANCELLED and held.taken is None
    w.advance_to(100)
    assert vm("vm1").state == "Stopped" and restarts("vm1") == 0


def test_r15a_stop_of_a_stopped_vm_with_nothing_pending_succeeds_and_changes_nothing():
    w = world({"hosts": {"h1": {}},
               "vms": {"idle": {"host": "h1", "state": "Stopped", "ha": True}}})
    before = (Event.objects.count(), HaWork.objects.count(),
              VMInstance.objects.get(name="idle").update_count)
    assert actions.stop_vm(vm("idle"), now=w.clock.now(), by="alice") is None
    assert actions.stop_vm(vm("idle"), now=w.clock.now(), by="alice") is None
    assert before == (Event.objects.count(), HaWork.objects.count(),
                      VMInstance.objects.get(name="idle").update_count)


def test_r15a_second_stop_while_one_is_queued_is_still_refused():
    """Nothing to cancel and a Stop already queued: a conflict, as before."""
    w = world({"hosts": {"h1": {}}, "vms": {"vm1": {"host": "h1"}}})
    actions.stop_vm(vm("vm1"), now=w.clock.now())
    before = Event.objects.count()
    with pytest.raises(actions.ActionError, match="stop in progress"):
        actions.stop_vm(vm("vm1"), now=w.clock.now())
    assert Event.objects.count() == before
