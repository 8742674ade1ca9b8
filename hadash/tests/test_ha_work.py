"""HA work (SPEC R10–R16), driven through the real engine on a simulated fleet with
virtual time (fleet.testing.world)."""

import datetime as dt

import pytest
from django.db import IntegrityError, transaction

from fleet.testing import world
from hadash import config
from hadash.choices import Reason, Step, WorkType
from hadash.ha import actions, cleanup, work, worker
from hadash.models import Alert, Event, HaWork
from hosts.models import Host
from vms.models import VMInstance

pytestmark = pytest.mark.django_db

TWO_HOSTS = {"hosts": {"h1": {}, "h2": {}}, "vms": {"vm1": {"host": "h1", "ha": True}}}


def vm(name):
    return VMInstance.objects.select_related("host").get(name=name)


def items(name, type=WorkType.HA):
    return list(HaWork.objects.filter(instance__name=name, type=type).order_by("id"))


def restarts(name):
    return Event.objects.filter(vm__name=name, event="HaStarted").count()


# --- R10 -----------------------------------------------------------------------------

def test_r10_database_refuses_a_second_unfinished_ha_item():
    """R10: at most one unfinished HA item per VM, enforced by the database itself."""
    w = world(TWO_HOSTS)
    v = vm("vm1")
    first = work.schedule_restart(v, investigate=True, reason=Reason.OPERATOR,
                                  now=w.clock.now())
    assert first is not None
    # Through the code path: refused quietly.
    assert work.schedule_restart(v, investigate=True, reason=Reason.OPERATOR,
                                 now=w.clock.now()) is None
    # Around the code: the database says no.
    with pytest.raises(IntegrityError), transaction.atomic():
        HaWork.objects.create(
            instance=v, vm_type=v.type, type=WorkType.HA, reason=Reason.OPERATOR,
            step=Step.SCHEDULED, state=v.state, update_count=v.update_count,
            time_to_try=w.clock.now(), created=w.clock.now(), updated=w.clock.now(),
        )
    # A finished item does not block a new one.
    HaWork.objects.filter(pk=first.pk).update(step=Step.DONE)
    assert work.schedule_restart(v, investigate=True, reason=Reason.OPERATOR,
                                 now=w.clock.now()) is not None


def test_r10_new_item_inherits_tries_within_time_between_failures():
    """R10/SPEC §2 time.between.failures: a new HA item for the same VM inherits
    `tried` inside the window, starts from 0 outside it."""
    w = world(TWO_HOSTS)
    v = vm("vm1")
    now = w.clock.now()
    old = work.schedule_restart(v, investigate=True, reason=Reason.OPERATOR, now=now)
    HaWork.objects.filter(pk=old.pk).update(step=Step.DONE, tried=3)
    inside = work.schedule_restart(v, investigate=True, reason=Reason.OPERATOR,
                                   now=now + dt.timedelta(seconds=3599))
    assert inside.tried == 3
    HaWork.objects.filter(pk=inside.pk).update(step=Step.DONE)
    HaWork.objects.update(created=now - dt.timedelta(hours=2))
    outside = work.schedule_restart(v, investigate=True, reason=Reason.OPERATOR, now=now)
    assert outside.tried == 0


def test_r10_host_down_schedules_system_vms_first_and_one_alert_names_ha_vms():
    """R10: schedule_restart_for_vms_on_host: system VMs first, then by priority; one
    event and one alert (the incident's, R19) naming the HA VMs."""
    w = world({
        "hosts": {"h1": {}, "h2": {}},
        "vms": {"a-low": {"host": "h1", "ha": True, "priority": "low"},
                "b-high": {"host": "h1", "ha": True, "priority": "high"},
                "c-plain": {"host": "h1"}},
    })
    VMInstance.objects.filter(name="c-plain").update(type="DomainRouter")
    w.fleet.power_off("h1")
    w.advance_to(46)
    order = list(HaWork.objects.filter(host__name="h1").order_by("id")
                 .values_list("instance__name", flat=True))
    assert order == ["c-plain", "b-high", "a-low"]
    scheduled = Event.objects.filter(event="HaScheduled")
    assert scheduled.count() == 1
    assert "a-low" in scheduled[0].message and "b-high" in scheduled[0].message
    assert "c-plain" not in scheduled[0].message.split("restart:")[1]
    [alert] = Alert.objects.all()
    assert alert.incident.host_name == "h1"
    assert "a-low" in alert.message and "b-high" in alert.message


def test_r10_a_down_hosts_vms_are_scheduled_at_once_as_one_by_one():
    """R10 for a Down host's VMs (scheduled together, issue 12): a VM that already has
    an unfinished HA item gets no second one, a VM whose last item is inside
    time.between.failures inherits its tries, each new item has its WorkScheduled
    event — and when the database refuses the batch (here: one VM twice; in life,
    another process scheduling one of them meanwhile) they are scheduled one by one,
    each VM once."""
    w = world({"hosts": {"h1": {}, "h2": {}},
               "vms": {"a": {"host": "h1", "ha": True}, "b": {"host": "h1", "ha": True},
                       "c": {"host": "h1", "ha": True}}})
    now = w.clock.now()
    busy = work.schedule_restart(vm("a"), investigate=False, reason=Reason.OPERATOR, now=now)
    old = work.schedule_restart(vm("b"), investigate=False, reason=Reason.OPERATOR, now=now)
    HaWork.objects.filter(pk=old.pk).update(step=Step.DONE, tried=2)
    h1 = Host.objects.get(name="h1")
    vms = HaWork.objects.vms_on_host(h1)
    new = HaWork.objects.schedule_restart_for_vms_on_host(
        h1, now=now, ha=lambda v, cfg: True, vms=vms)
    assert [i.instance.name for i in new] == ["b", "c"]
    assert [(i.step, i.tried, i.host_id) for i in new] == [
        (Step.INVESTIGATING, 2, h1.pk), (Step.INVESTIGATING, 0, h1.pk)]
    assert [i.pk for i in items("a")] == [busy.pk]
    for item in new:
        [ev] = Event.objects.filter(event="WorkScheduled", subject_id=item.pk)
        assert ev.vm.name == item.instance.name and ev.new == Step.INVESTIGATING
        assert f"work #{item.pk} scheduled for VM {item.instance.name}" in ev.message
    # Refused as a whole: one by one, and nothing is scheduled twice.
    HaWork.objects.filter(pk__in=[i.pk for i in new]).update(step=Step.DONE)
    c = vm("c")
    again = HaWork.objects._schedule_restarts([c, c], reason=Reason.HOST_DOWN, now=now,
                                              cfg=config.snapshot())
    assert len(again) == 1 and again[0].instance_id == c.pk
    assert len(HaWork.objects.unfinished().filter(instance=c)) == 1


# --- R11 -----------------------------------------------------------------------------

def test_r11_due_items_taken_by_system_vm_then_priority_then_age():
    w = world({
        "hosts": {"h1": {}, "h2": {}},
        "vms": {"low": {"host": "h1", "priority": "low"},
                "high": {"host": "h1", "priority": "high"},
                "med1": {"host": "h1"}, "med2": {"host": "h1"},
                "router": {"host": "h1"}},
    })
    VMInstance.objects.filter(name="router").update(type="DomainRouter")
    now = w.clock.now()
    for i, name in enumerate(["low", "med2", "high", "med1", "router"]):
        work.schedule_restart(vm(name), investigate=True, reason=Reason.OPERATOR,
                              now=now + dt.timedelta(microseconds=i))
    HaWork.objects.filter(instance__name="med1").update(created=now - dt.timedelta(seconds=5))
    order = [i.instance.name for i in work.due_items(now + dt.timedelta(seconds=1))]
    assert order == ["router", "high", "med1", "med2", "low"]


def test_r11_never_more_than_ha_workers_in_flight():
    """R11: claims stop at ha.workers items in flight across the installation, and an
    edit of ha.workers takes effect at the next claim (no restart)."""
    w = world({"hosts": {"h1": {}, "h2": {}},
               "vms": {f"vm{i}": {"host": "h1", "ha": True} for i in range(6)}})
    config.set_value("ha.workers", 2)
    for v in VMInstance.objects.all():
        work.schedule_restart(v, investigate=True, reason=Reason.OPERATOR, now=w.clock.now())
    cfg = config.snapshot()
    a = work.claim(w.engine.with_worker("a"), cfg)
    b = work.claim(w.engine.with_worker("b"), cfg)
    assert a and b and a.pk != b.pk
    assert work.claim(w.engine.with_worker("c"), cfg) is None
    config.set_value("ha.workers", 3)
    assert work.claim(w.engine.with_worker("c"), config.snapshot()) is not None


def test_r11_a_dead_workers_item_is_retaken_after_the_lease_and_done_once():
    """R11: a worker that dies leaves its item taken; after the lease another worker
    retakes it; the VM is started exactly once."""
    w = world(TWO_HOSTS)
    w.fleet.power_off("h1")  # last ping at t=0: behind after t=25
    w.advance_to(25)
    host = Host.objects.get(name="h1")
    from hosts.liveness import host_down

    host_down(host, now=w.clock.now(), cfg=config.snapshot(), by="test")
    dead = work.claim(w.engine.with_worker("dies"), config.snapshot())
    assert dead is not None
    # Nobody else may take it while the lease runs…
    w.clock.set(25 + 60)
    assert work.claim(w.engine.with_worker("other"), config.snapshot()) is None
    # …after it, another worker does, and finishes the job.
    w.clock.set(25 + 301)
    assert worker.worker_step(w.engine.with_worker("other"))
    item = HaWork.objects.get(pk=dead.pk)
    assert item.step == Step.DONE
    assert vm("vm1").state == "Running" and vm("vm1").host.name == "h2"
    assert restarts("vm1") == 1
    # The dead worker's late writes are refused.
    with pytest.raises(work.LostItem):
        work.set_step(dead, Step.ERROR, now=w.clock.now())
    assert HaWork.objects.get(pk=dead.pk).step == Step.DONE


# --- R12 -----------------------------------------------------------------------------

def test_r12_vm_changed_since_scheduling_ends_done_without_action():
    """R12.1: an operator acted on the VM after scheduling → Done, nothing started."""
    w = world(TWO_HOSTS)
    v = vm("vm1")
    item = work.schedule_restart(v, investigate=True, reason=Reason.OPERATOR,
                                 now=w.clock.now())
    v.transition("Stopped", now=w.clock.now(), host=None)
    calls = len(w.fleet.calls)
    w.advance_to(1)
    item.refresh_from_db()
    assert item.step == Step.DONE
    assert "changed since scheduling" in Event.objects.filter(event="WorkStep").last().message
    assert all(c[0] != "start" for c in w.fleet.calls[calls:])


def test_r12_alive_vm_on_up_host_is_left_alone():
    """R12.2: investigation finds the VM alive on an Up host → Done, no restart."""
    w = world(TWO_HOSTS)
    item = work.schedule_restart(vm("vm1"), investigate=True, reason=Reason.OPERATOR,
                                 now=w.clock.now())
    w.advance_to(1)
    item.refresh_from_db()
    assert item.step == Step.DONE
    assert vm("vm1").host.name == "h1" and restarts("vm1") == 0


def test_r12_unknown_fate_fences_before_restarting():
    """R12.2: the VM's fate is unknown (host cut off, BMC says On) → fence the host;
    only after the fence is the VM started elsewhere — never two copies."""
    w = world(TWO_HOSTS)
    w.apply("host h1 network off")
    item = work.schedule_restart(vm("vm1"), investigate=True, reason=Reason.OPERATOR,
                                 now=w.clock.now())
    w.advance_to(1)
    item.refresh_from_db()
    assert ("fence", "h1") in w.fleet.calls
    assert item.step == Step.DONE
    assert vm("vm1").host.name == "h2"
    assert w.fleet.where("vm1") == ["h2"]
    fenced = Event.objects.get(event="HostFenced", host__name="h1")
    # R18: the fence is part of h1's incident, which records when it happened.
    assert fenced.incident is not None and fenced.incident.fenced_at == fenced.time
    assert Host.objects.get(name="h1").status == "Down"


def test_r12_starting_is_stamped_when_the_host_is_chosen(monkeypatch):
    """R18's phases come from the events: HaStarting and the item's Restarting step are
    stamped when placement has chosen the host, not when it began — here placement
    takes 0.4 s (of virtual time), which before showed as part of the start call."""
    from vms import placement

    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {"vm1": {"host": "h1", "ha": True}}})
    w.apply("host h1 power off")
    real = placement.ranked
    began = []

    def slow_ranked(*args, **kwargs):
        began.append(w.clock.now())
        w.clock.advance(0.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(placement, "ranked", slow_ranked)
    w.advance_to(30)  # h1 is found Down, vm1 restarted (R4, R12)
    assert vm("vm1").host.name == "h2" and vm("vm1").state == "Running"
    starting = Event.objects.get(event="HaStarting", vm__name="vm1")
    restarting = Event.objects.get(field="step", new=Step.RESTARTING)
    assert len(began) == 2  # ranked, then again under the host's lock (R24)
    assert starting.time == restarting.time == began[-1] + dt.timedelta(seconds=0.2)


def test_r12_fencing_failure_never_restarts_and_alerts():
    """R12.2: fencing failed → event and the incident's alert says so (R19), retry
    after restart.retry.interval, waiting fencing-failed (R17); the VM is not started
    anywhere while its old host might still run it."""
    w = world({**TWO_HOSTS, "config": {"restart.retry.interval": 30}})
    w.apply("host h1 network off")
    w.apply("bmc h1 fail")
    item = work.schedule_restart(vm("vm1"), investigate=True, reason=Reason.OPERATOR,
                                 now=w.clock.now())
    w.advance_to(100)
    item.refresh_from_db()
    assert item.step == Step.FENCING
    assert not any(c[0] == "start" for c in w.fleet.calls)
    fails = Event.objects.filter(event="FenceFailed")
    assert 3 <= fails.count() <= 5  # t=0, 30, 60, 90
    assert item.waiting == "fencing-failed" and "fencing h1 failed" in item.last_error
    [alert] = Alert.objects.filter(state="open")
    assert alert.title == "Fencing h1 failed: its VMs wait"
    assert w.fleet.where("vm1") == ["h1"]
    # The BMC comes back: the next try fences and restarts.
    w.apply("bmc h1 ok")
    w.advance_to(130)
    item.refresh_from_db()
    assert item.step == Step.DONE and vm("vm1").host.name == "h2"
    assert item.waiting == ""  # moved on: no longer waiting


def test_r12_backoff_doubles_and_is_capped_at_an_hour():
    cfg = {"restart.retry.interval": 600}
    assert [work.backoff_seconds(cfg, n) for n in (1, 2, 3, 4, 5, 6)] == [
        600, 1200, 2400, 3600, 3600, 3600]


def test_r12_non_ha_vm_is_stopped_and_not_restarted():
    """R12.4: a VM of a failed host that is not HA-enabled ends Stopped."""
    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {"vm2": {"host": "h1"}}})
    w.fleet.power_off("h1")
    w.advance_to(60)
    assert vm("vm2").state == "Stopped" and vm("vm2").host is None
    assert vm("vm2").last_host.name == "h1"
    assert items("vm2")[-1].step == Step.DONE
    assert w.fleet.where("vm2") == []


def test_r12_start_failures_count_and_end_in_error_with_alert():
    """R12.5: failed starts count towards vm.ha.migration.max.retries; then Error;
    the host's incident fails with its one alert (R18, R19); the VM stays Stopped."""
    w = world({**TWO_HOSTS, "config": {"restart.retry.interval": 5,
                                       "vm.ha.migration.max.retries": 2}})
    w.fleet.start_fail("h2", 10)
    w.fleet.power_off("h1")
    w.advance_to(120)
    [item] = items("vm1")
    assert item.step == Step.ERROR and item.tried == 2
    assert Event.objects.filter(subject="work", severity="critical", new=Step.ERROR).exists()
    [alert] = Alert.objects.all()
    assert alert.state == "resolved" and alert.incident.state == "Failed"
    assert alert.incident.vms_failed == 1
    assert vm("vm1").state == "Stopped"


# --- R13 (no capacity is not an error) ------------------------------------------------

def test_r13_no_capacity_retries_without_counting_tries():
    w = world({"hosts": {"h1": {"cpus": 2}, "h2": {"cpus": 2}},
               "vms": {"vm1": {"host": "h1", "ha": True, "cpus": 2},
                       "big": {"host": "h2", "cpus": 2}},
               "config": {"restart.retry.interval": 10, "vm.ha.migration.max.retries": 1}})
    w.fleet.power_off("h1")
    w.advance_to(200)
    [item] = items("vm1")
    assert item.step == Step.SCHEDULED and item.tried == 0
    assert "no host has room" in item.last_error


# --- R14 -----------------------------------------------------------------------------

def test_r14_brake_pauses_starts_and_is_announced_once():
    w = world({"hosts": {"h1": {}, "h2": {}, "h3": {}},
               "vms": {"vm1": {"host": "h1", "ha": True}, "vm2": {"host": "h2", "ha": True}},
               "config": {"investigate.retry.interval": 20}})
    w.fleet.power_off("h1")
    w.fleet.power_off("h2")
    w.advance_to(120)
    assert restarts("vm1") == restarts("vm2") == 0
    assert vm("vm1").state == "Stopped"  # investigation and stopping go on
    assert Event.objects.filter(event="BrakeEngaged").count() == 1
    brake_alert = Alert.objects.get(kind="BrakeEngaged")  # R19: one per cluster
    assert brake_alert.state == "open" and brake_alert.subject_name == "c1"
    [waiting] = items("vm1")
    assert waiting.waiting == "braked"
    assert "2 of 3 hosts Down or Alert, limit 0.5" in waiting.last_error
    assert all(i.tried == 0 for i in items("vm1") + items("vm2"))
    # h2 comes back: 1 of 3 down is within 0.5 → released, restarts resume at once.
    w.apply("host h2 power on")
    w.advance_to(122)
    assert Event.objects.filter(event="BrakeReleased").count() == 1
    brake_alert.refresh_from_db()
    assert brake_alert.state == "resolved"
    assert vm("vm1").state == "Running" and vm("vm2").state == "Running"


# --- R15 -----------------------------------------------------------------------------

def test_r15_maintenance_migrates_every_running_vm_then_maintenance():
    w = world({"hosts": {"h1": {}, "h2": {}},
               "vms": {"a": {"host": "h1"}, "b": {"host": "h1", "ha": True}}})
    w.apply("host h1 maintenance")
    assert Host.objects.get(name="h1").resource_state == "PrepareForMaintenance"
    assert len(items("a", WorkType.MIGRATION)) == 1
    w.advance_to(2)
    assert vm("a").host.name == "h2" and vm("b").host.name == "h2"
    assert sorted(w.fleet.host("h2").vms) == ["a", "b"]
    assert Host.objects.get(name="h1").resource_state == "Maintenance"
    w.apply("host h1 cancel-maintenance")
    assert Host.objects.get(name="h1").resource_state == "Enabled"


def test_r15_failed_migration_leaves_error_in_maintenance():
    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {"a": {"host": "h1"}}})
    w.fleet.network("h2", False)  # the target can't take it; h2 still Up in the DB
    w.apply("host h1 maintenance")
    w.advance_to(1)
    assert Host.objects.get(name="h1").resource_state == "ErrorInMaintenance"
    # R15 (clarified): the Migration work keeps retrying every migrate.retry.interval.
    item = items("a", WorkType.MIGRATION)[-1]
    assert item.step == Step.SCHEDULED and item.tried == 1
    assert item.time_to_try > w.clock.now()
    assert vm("a").state == "Running" and vm("a").host.name == "h1"
    assert Event.objects.filter(event="ResourceStateChanged",
                                new="ErrorInMaintenance").exists()
    alert = Alert.objects.get(kind="ErrorInMaintenance", subject_name="h1")
    assert alert.state == "open"
    assert item.waiting == "backoff"
    # R19: cancelling the maintenance resolves it.
    w.apply("host h1 cancel-maintenance")
    alert.refresh_from_db()
    assert alert.state == "resolved"


def test_r15_host_without_vms_goes_straight_to_maintenance():
    w = world({"hosts": {"h1": {}, "h2": {}}})
    actions.prepare_maintenance(Host.objects.get(name="h1"), now=w.clock.now())
    assert Host.objects.get(name="h1").resource_state == "Maintenance"


# --- R16 -----------------------------------------------------------------------------

def test_r16_cleanup_purges_old_done_and_cancelled_but_keeps_events_and_errors():
    w = world(TWO_HOSTS)
    now = w.clock.now()
    v = vm("vm1")
    made = {}
    for step in (Step.DONE, Step.CANCELLED, Step.ERROR):
        item = work.schedule_restart(v, investigate=True, reason=Reason.OPERATOR, now=now)
        HaWork.objects.filter(pk=item.pk).update(step=step)
        made[step] = item.pk
    recent = work.schedule_restart(v, investigate=True, reason=Reason.OPERATOR, now=now)
    HaWork.objects.filter(pk=recent.pk).update(step=Step.DONE)
    HaWork.objects.exclude(pk=recent.pk).update(updated=now - dt.timedelta(hours=2))
    events_before = Event.objects.count()
    w.clock.set(10)
    assert cleanup.cleanup_step(w.engine, force=True) == 2
    left = set(HaWork.objects.values_list("pk", flat=True))
    assert left == {made[Step.ERROR], recent.pk}
    assert Event.objects.count() == events_before
    # Not due again until time.between.cleanup has passed.
    HaWork.objects.filter(pk=recent.pk).update(updated=now - dt.timedelta(hours=2))
    w.clock.set(20)
    assert cleanup.cleanup_step(w.engine) == 0
    w.clock.set(10 + 86400)
    assert cleanup.cleanup_step(w.engine) == 1


# --- operator stop -----------------------------------------------------------------------

def test_operator_stop_is_queued_and_done_by_a_worker():
    w = world(TWO_HOSTS)
    actions.stop_vm(vm("vm1"), now=w.clock.now(), by="alice")
    with pytest.raises(actions.ActionError):
        actions.stop_vm(vm("vm1"), now=w.clock.now())
    w.advance_to(1)
    assert vm("vm1").state == "Stopped"
    assert w.fleet.where("vm1") == []
    # An operator stop is not a failure: no HA follows.
    w.advance_to(40)
    assert items("vm1") == [] and restarts("vm1") == 0


def test_r11_one_claim_takes_several_items_in_order_within_ha_workers():
    """R11, issue 12: a claim for several threads takes the next items in R11's order
    (system VMs, then priority, then age), never past ha.workers in flight."""
    from hosts.liveness import host_down

    w = world({"hosts": {"h1": {}, "h2": {"cpus": 64}},
               "vms": {"a-low": {"host": "h1", "ha": True, "priority": "low"},
                       "b-high": {"host": "h1", "ha": True, "priority": "high"},
                       "c-med": {"host": "h1", "ha": True},
                       "d-med": {"host": "h1", "ha": True}},
               "config": {"ha.workers": 3}})
    w.fleet.power_off("h1")
    host_down(Host.objects.get(name="h1"), now=w.clock.now(), cfg=config.snapshot(), by="test")
    items = work.claim_many(w.engine.with_worker("w1"), config.snapshot(), 10)
    assert [i.instance.name for i in items] == ["b-high", "c-med", "d-med"]
    assert all(i.taken_by == "w1" for i in items)
    assert work.claim_many(w.engine.with_worker("w2"), config.snapshot(), 10) == []


def test_r11_an_item_released_before_it_is_handed_over_is_not_taken_over():
    """Issue 12: an item claimed for another thread is that thread's once handed over;
    if the claimer released it first (it lost its connection while claiming), the hand
    over is refused and the item is free for any worker."""
    from hosts.liveness import host_down

    w = world({"hosts": {"h1": {}, "h2": {}},
               "vms": {"v1": {"host": "h1", "ha": True}, "v2": {"host": "h1", "ha": True}}})
    w.fleet.power_off("h1")
    host_down(Host.objects.get(name="h1"), now=w.clock.now(), cfg=config.snapshot(), by="test")
    first, second = work.claim_many(w.engine.with_worker("claimer"), config.snapshot(), 2)
    assert work.hand_over(first, "other")
    assert HaWork.objects.get(pk=first.pk).taken_by == "other"
    assert work.release_held_by("claimer", now=w.clock.now(), message="lost") == 1
    assert not work.hand_over(second, "third")
    assert work.claim(w.engine.with_worker("anyone"), config.snapshot()).pk == second.pk


def test_r12_ha_start_sends_the_stored_definition_and_none_without_one(monkeypatch):
    """R12.5 / PROTOCOL.md v1.1: an HA restart's start carries the VM's stored
    definition; a VM without one is started without (its definition is not asked for
    again on the way to the start call, issue 12)."""
    from fleet.sim import SimAgentClient

    w = world({"hosts": {"h1": {}, "h2": {}},
               "vms": {"d": {"host": "h1", "ha": True}, "p": {"host": "h1", "ha": True}}})
    xml = "<domain type='kvm'><name>d</name><vcpu>1</vcpu></domain>"
    VMInstance.objects.filter(name="d").update(definition_format="libvirt-xml",
                                               definition_xml=xml)
    sent = {}
    real = SimAgentClient.start_vm

    def start_vm(self, host, vm, definition=None):
        sent[vm.name] = definition
        return real(self, host, vm, definition)

    monkeypatch.setattr(SimAgentClient, "start_vm", start_vm)
    w.fleet.power_off("h1")
    w.advance_to(60)
    assert sent == {"d": {"format": "libvirt-xml", "xml": xml}, "p": None}
    assert {v.name: v.host.name for v in VMInstance.objects.select_related("host")} == \
        {"d": "h2", "p": "h2"}


@pytest.mark.parametrize("found_down", ["later", "during the start"])
def test_r12_a_start_on_a_host_that_then_goes_down_is_retried_elsewhere_at_once(
        monkeypatch, found_down):
    """R12.5 with R4/R12.2 (issue 12): an HA start that fails because its target host is
    failing too — placed there before the host was late with its pings, as when a rack
    fails — waits out the back-off only while that host might still run the VM. Once the
    host is found Down (after the failure, or while the start was under way) the item is
    tried again at once, elsewhere, with its event; the failed start counts as a try."""
    from fleet.sim import SimAgentClient
    from hosts.liveness import host_down

    w = world({"hosts": {"h1": {}, "h2": {"cpus": 64}, "h3": {"cpus": 8}},
               "vms": {"v": {"host": "h1", "ha": True}},
               "config": {"ha.max.hosts.down.ratio": 1}})  # 2 of 3 hosts go: no brake
    real = SimAgentClient.start_vm

    def start_vm(self, host, vm, definition=None):
        if host.name == "h2":
            w.fleet.power_off("h2")  # it fails while the start is on its way
            if found_down == "during the start":
                assert host_down(Host.objects.get(name="h2"), now=w.clock.now(),
                                 cfg=config.snapshot(), by="test")
        return real(self, host, vm, definition)

    monkeypatch.setattr(SimAgentClient, "start_vm", start_vm)
    w.fleet.power_off("h1")
    w.advance_to(60)
    v = vm("v")
    assert (v.state, v.host.name) == ("Running", "h3")
    assert [c[1] for c in w.fleet.calls if c[0] == "start"] == ["h2", "h3"]
    [item] = items("v")
    assert item.step == Step.DONE and item.tried == 1
    said = "h2 is Down now" if found_down == "later" else "and h2 is Down; try 1 of"
    [again] = Event.objects.filter(event="WorkRetry", subject_id=item.pk,
                                   message__contains=said)
    assert Host.objects.get(name="h2").status == "Down"
    assert again.time <= Event.objects.get(event="HaStarted", vm__name="v").time
