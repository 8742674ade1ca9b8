"""VM power-state sync (SPEC R8–R9): what the power reports in agents' pings do to VMs,
driven through the real engine on a simulated fleet with virtual time
(fleet.testing.world). Assertions are about what an operator sees: VM state, host,
power state, HA work items, events, and what the server asked the agents."""

import datetime as dt

import pytest

from fleet.testing import world
from hadash.choices import Reason, Step, WorkType
from hadash.ha import work
from hadash.models import Event, HaWork
from vms.choices import PowerState, VmState
from vms.models import VMInstance

pytestmark = pytest.mark.django_db


# --- helpers -------------------------------------------------------------------------

def vm(name):
    return VMInstance.objects.select_related("host", "last_host", "power_host").get(name=name)


def at(w, t):
    return w.clock.epoch + dt.timedelta(seconds=t)


def ha_items(name=None):
    qs = HaWork.objects.filter(type=WorkType.HA)
    if name is not None:
        qs = qs.filter(instance__name=name)
    return list(qs.order_by("id"))


def restarts(name):
    return Event.objects.filter(vm__name=name, event="HaStarted").count()


def power_events(name):
    return list(Event.objects.filter(vm__name=name, event="PowerStateChanged").order_by("id"))


def one_vm(ha, **config):
    return world({"config": config, "hosts": {"h1": {}, "h2": {}},
                  "vms": {"vm1": {"host": "h1", "ha": ha}}})


# --- R8: reports -----------------------------------------------------------------------

def test_r8_unknown_vm_names_in_a_report_are_ignored():
    """R8: names in a report that hadash does not know are ignored: no VM appears, no
    event mentions them, and the rest of the report is still taken (vm1 confirmed)."""
    w = one_vm(ha=True)
    w.fleet.host("h1").vms["ghost-on"] = "PowerOn"
    w.fleet.host("h1").vms["ghost-off"] = "PowerOff"
    w.advance_to(10)
    assert not VMInstance.objects.filter(name__startswith="ghost").exists()
    assert not Event.objects.filter(message__contains="ghost").exists()
    v = vm("vm1")
    assert (v.state, v.host.name, v.power_state) == (VmState.RUNNING, "h1", PowerState.POWER_ON)
    assert v.power_state_update_time == at(w, 10)
    assert HaWork.objects.count() == 0


def test_r8_power_off_from_a_host_the_vm_no_longer_lives_on_is_ignored():
    """R8: a PowerOff about a VM that lives on another host is stale: the VM stays
    Running on its host with its power state as that host reports it; nothing is
    scheduled and nothing is stopped."""
    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {"vm1": {"host": "h2", "ha": True}}})
    w.advance_to(5)
    w.fleet.host("h1").vms["vm1"] = "PowerOff"  # h1's hypervisor still lists an old copy
    w.advance_to(30)
    v = vm("vm1")
    assert (v.state, v.host.name) == (VmState.RUNNING, "h2")
    assert (v.power_state, v.power_host.name) == (PowerState.POWER_ON, "h2")
    assert power_events("vm1") == []
    assert HaWork.objects.count() == 0
    assert [c for c in w.fleet.calls if c[0] in ("stop", "start")] == []


@pytest.mark.parametrize("vanish_at,missing_at", [(5, 30), (25, 50)])
def test_r8_vm_left_out_of_report_is_missing_only_after_two_ping_intervals(
    vanish_at, missing_at
):
    """R8: a Running VM its host's report leaves out becomes PowerReportMissing only once
    its power state (last confirmed by a report) is older than 2 × ping.interval — the
    first pings after it vanished do not mark it. R9: a non-HA VM is then Stopped."""
    w = one_vm(ha=False)
    w.advance_to(vanish_at)
    w.apply("vm vm1 vanish")
    for t in range(vanish_at + 1, missing_at):
        w.advance_to(t)
        v = vm("vm1")
        assert (v.state, v.power_state) == (VmState.RUNNING, PowerState.POWER_ON), f"t={t}"
    w.advance_to(missing_at)
    v = vm("vm1")
    assert v.power_state == PowerState.POWER_REPORT_MISSING
    [ev] = power_events("vm1")
    assert (ev.old, ev.new, ev.time) == ("PowerOn", "PowerReportMissing", at(w, missing_at))
    assert (v.state, v.host, v.last_host.name) == (VmState.STOPPED, None, "h1")
    assert ha_items() == []


def test_r8_r9_vanished_ha_vm_is_restarted_with_reason_vm_report_missing():
    """R8/R9: an HA VM its hypervisor forgot becomes PowerReportMissing after
    2 × ping.interval and gets an HA item with reason VmReportMissing; HA restarts it."""
    w = one_vm(ha=True)
    w.advance_to(5)
    w.apply("vm vm1 vanish")
    w.advance_to(29)
    assert ha_items() == []
    w.advance_to(30)
    [item] = ha_items("vm1")
    assert (item.reason, item.step) == (Reason.VM_REPORT_MISSING, Step.DONE)
    v = vm("vm1")
    assert v.state == VmState.RUNNING
    assert restarts("vm1") == 1
    assert w.fleet.where("vm1") == [v.host.name]
    assert w.result.violations == []


# --- R9: what a power change does -------------------------------------------------------

def test_r9_crashed_ha_vm_gets_an_ha_item_and_is_restarted():
    """R9: an HA VM that powers off by itself while Running gets an HA item (reason
    VmPowerOff); HA makes its old hypervisor forget it and starts it on the least
    loaded host."""
    w = world({"hosts": {"h1": {}, "h2": {}},
               "vms": {"vm1": {"host": "h1", "ha": True},
                       "load": {"host": "h1", "cpus": 4}}})
    w.advance_to(5)
    w.apply("vm vm1 crash")
    w.advance_to(9)
    assert ha_items() == []
    assert vm("vm1").state == VmState.RUNNING
    w.advance_to(10)  # h1's ping reports vm1 PowerOff
    [item] = ha_items("vm1")
    assert (item.reason, item.step) == (Reason.VM_POWER_OFF, Step.DONE)
    assert power_events("vm1")[0].new == PowerState.POWER_OFF
    assert ("stop", "h1", "vm1") in w.fleet.calls
    assert ("start", "h2", "vm1") in w.fleet.calls
    v = vm("vm1")
    assert (v.state, v.host.name, v.power_state) == (VmState.RUNNING, "h2", PowerState.POWER_ON)
    assert restarts("vm1") == 1
    assert w.fleet.where("vm1") == ["h2"]
    assert "vm1" not in w.fleet.host("h1").vms


@pytest.mark.parametrize(
    "ha,config,restarted",
    [
        (False, {}, False),
        (True, {"ha.vm.restart.hostup": False}, False),
        (True, {"vm.ha.enabled": False}, False),
        (False, {"force.ha": True}, True),
    ],
    ids=["not-ha", "ha-but-restart-hostup-false", "ha-but-vm-ha-disabled", "force-ha"],
)
def test_r9_crash_restarts_only_when_ha_wanted_otherwise_out_of_band_stop(
    ha, config, restarted
):
    """R9: on PowerOff while Running, a VM is restarted only if (ha_enabled or force.ha)
    and ha.vm.restart.hostup (and the vm.ha.enabled master switch is on); otherwise it
    is marked Stopped (out-of-band stop): no host, last_host its old host, no HA item."""
    w = one_vm(ha, **config)
    w.advance_to(5)
    w.apply("vm vm1 crash")
    w.advance_to(20)
    v = vm("vm1")
    if restarted:
        [item] = ha_items("vm1")
        assert (item.reason, item.step) == (Reason.VM_POWER_OFF, Step.DONE)
        assert v.state == VmState.RUNNING
        assert restarts("vm1") == 1
        assert w.fleet.where("vm1") == [v.host.name]
    else:
        assert (v.state, v.host, v.last_host.name) == (VmState.STOPPED, None, "h1")
        assert ha_items() == []
        assert restarts("vm1") == 0
        assert Event.objects.filter(vm__name="vm1", event="OutOfBandStop").count() == 1
        assert [c for c in w.fleet.calls if c[0] == "start"] == []
        assert w.fleet.where("vm1") == []


def test_r9_power_on_reported_for_a_stopped_vm_makes_it_running_on_the_reporting_host():
    """R9: PowerOn reported for a Stopped VM is an out-of-band start: it is Running on
    the host that reported it."""
    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {"vm2": {"state": "Stopped"}}})
    w.fleet.host("h2").vms["vm2"] = "PowerOn"
    w.advance_to(0)
    v = vm("vm2")
    assert (v.state, v.host.name, v.power_state, v.power_host.name) == (
        VmState.RUNNING, "h2", PowerState.POWER_ON, "h2")
    ev = Event.objects.get(vm__name="vm2", field="state")
    assert (ev.event, ev.old, ev.new) == ("OutOfBandStart", "Stopped", "Running")
    assert HaWork.objects.count() == 0


@pytest.mark.parametrize("state", [VmState.STARTING, VmState.STOPPING, VmState.MIGRATING])
def test_r9_power_off_while_in_transition_is_stopped_without_ha(state):
    """R9: PowerOff while Starting, Stopping or Migrating → Stopped (the agent's report
    is followed), even for an HA VM: no HA item."""
    w = one_vm(ha=True)
    w.advance_to(5)  # after the ping at t=0, which still reported PowerOn
    VMInstance.objects.filter(name="vm1").update(state=state)
    w.apply("vm vm1 crash")
    w.advance_to(10)
    v = vm("vm1")
    assert (v.state, v.host, v.last_host.name) == (VmState.STOPPED, None, "h1")
    assert ha_items() == []


def test_r8_r9_report_missing_while_stopping_is_stopped_without_ha():
    """R8/R9: a Stopping VM that its host's report leaves out becomes PowerReportMissing
    after 2 × ping.interval and is then Stopped, without HA."""
    w = one_vm(ha=True)
    w.advance_to(5)  # after the ping at t=0, which still reported PowerOn
    VMInstance.objects.filter(name="vm1").update(state=VmState.STOPPING)
    w.apply("vm vm1 vanish")
    w.advance_to(29)
    assert vm("vm1").state == VmState.STOPPING
    w.advance_to(30)
    v = vm("vm1")
    assert (v.state, v.power_state) == (VmState.STOPPED, PowerState.POWER_REPORT_MISSING)
    assert ha_items() == []


@pytest.mark.parametrize("state", [VmState.STARTING, VmState.STOPPING, VmState.MIGRATING])
def test_r9_power_on_while_in_transition_is_running_on_the_power_host(state):
    """R9: PowerOn while Starting, Stopping or Migrating → Running on power_host."""
    w = one_vm(ha=False)
    VMInstance.objects.filter(name="vm1").update(state=state)
    w.advance_to(10)
    v = vm("vm1")
    assert (v.state, v.host.name, v.power_host.name) == (VmState.RUNNING, "h1", "h1")
    assert Event.objects.filter(vm__name="vm1", event="OutOfBandStart").count() == 1


def test_r9_vm_with_an_unfinished_ha_item_is_left_to_that_item():
    """R9: a VM with an unfinished HA item is left to it: power changes are recorded but
    neither create a second item nor mark the VM Stopped; when the item runs it does
    the job (the HA VM is restarted, the non-HA VM stays Stopped)."""
    w = world({"hosts": {"h1": {}, "h2": {}},
               "vms": {"vm1": {"host": "h1", "ha": True}, "vm2": {"host": "h1"}}})
    first = {}
    for name in ("vm1", "vm2"):
        item = work.schedule_restart(vm(name), investigate=True, reason=Reason.OPERATOR,
                                     now=w.clock.now())
        first[name] = item.pk
    # Not due during the first part of the test.
    HaWork.objects.update(time_to_try=at(w, 3600))
    w.advance_to(5)
    w.apply("vm vm1 crash")
    w.apply("vm vm2 vanish")
    w.advance_to(40)
    v1, v2 = vm("vm1"), vm("vm2")
    assert v1.power_state == PowerState.POWER_OFF
    assert v2.power_state == PowerState.POWER_REPORT_MISSING
    for v in (v1, v2):
        assert (v.state, v.host.name) == (VmState.RUNNING, "h1")
        assert [i.pk for i in ha_items(v.name)] == [first[v.name]]
        assert ha_items(v.name)[0].step == Step.INVESTIGATING
    assert HaWork.objects.count() == 2
    # Let the items run.
    HaWork.objects.update(time_to_try=at(w, 40))
    w.advance_to(41)
    assert [i.step for i in ha_items()] == [Step.DONE, Step.DONE]
    assert vm("vm1").state == VmState.RUNNING and restarts("vm1") == 1
    assert (vm("vm2").state, restarts("vm2")) == (VmState.STOPPED, 0)
    w.advance_to(70)
    assert HaWork.objects.filter(type=WorkType.HA).count() == 2
    assert w.result.violations == []


def test_r9_vm_started_out_of_band_while_its_ha_item_waits_is_not_started_twice():
    """R9 + §6 invariant: an HA VM waits for capacity (Stopped, item Scheduled); its old
    host boots and the operator starts the VM there by hand (out-of-band start). When
    capacity appears elsewhere, HA must not start a second copy: the VM never runs on two
    hosts, and its record says where it runs."""
    w = world({"config": {"restart.retry.interval": 30},
               "hosts": {"h1": {}, "h2": {"cpus": 4}},
               "vms": {"big": {"host": "h1", "ha": True, "cpus": 8},
                       "load": {"host": "h1", "cpus": 2}}})
    w.advance_to(5)
    w.apply("host h1 power off")
    w.advance_to(26)  # h1 Down; big fits nowhere: Stopped, its item waits
    assert ha_items("big")[0].step == Step.SCHEDULED
    w.advance_to(30)
    w.apply("host h1 power on")
    w.advance_to(35)
    # The operator starts both VMs by hand on h1's hypervisor.
    w.fleet.host("h1").vms["big"] = "PowerOn"
    w.fleet.host("h1").vms["load"] = "PowerOn"
    w.advance_to(45)
    assert (vm("load").state, vm("load").host.name) == (VmState.RUNNING, "h1")
    w.fleet.add_host("h3")  # capacity appears elsewhere
    w.connect("h3")
    w.advance_to(70)
    assert w.result.violations == []
    where = w.fleet.where("big")
    assert len(where) == 1
    v = vm("big")
    assert (v.state, v.host.name) == (VmState.RUNNING, where[0])


def test_r8_a_report_that_arrived_before_the_vm_was_placed_does_not_mark_it_missing():
    """R8 under ingestion delay: a host's report that arrived before HA placed a VM
    there cannot list it. Applied late (a queued ping carries its arrival time), it
    leaves the freshly started VM Running — no PowerReportMissing, no second HA item —
    while a report that arrived more than 2 × ping.interval after the placement and
    still leaves the VM out does mark it missing."""
    from hosts.agent.service import ping
    from hosts.models import Host

    w = one_vm(ha=True)
    w.advance_to(5)
    w.apply("host h1 power off")
    t = 5
    while vm("vm1").host is None or vm("vm1").host.name != "h2" \
            or vm("vm1").state != VmState.RUNNING:
        t += 1
        assert t < 60, "vm1 was not restarted on h2"
        w.advance_to(t)
    placed = vm("vm1").power_state_update_time
    h2 = Host.objects.get(name="h2")
    ping(h2, [], now=placed - dt.timedelta(seconds=0.5))
    v = vm("vm1")
    assert (v.state, v.power_state, v.host.name) == (VmState.RUNNING, PowerState.POWER_ON, "h2")
    assert [e.new for e in power_events("vm1")].count("PowerReportMissing") == 0
    assert len(ha_items("vm1")) == 1
    # Control: the same empty report, arriving well after the placement, counts.
    from hadash import config

    late = placed + dt.timedelta(seconds=2 * config.get("ping.interval") + 1)
    ping(Host.objects.get(name="h2"), [], now=late)
    assert vm("vm1").power_state == PowerState.POWER_REPORT_MISSING


def test_r8_a_late_applied_report_never_moves_the_last_confirmation_back():
    """R8 measures "missing" from the last confirmation of a VM's power state. A
    report applied after a newer one (queued pings carry their arrival time) confirms
    the VM but leaves the newer confirmation time in place."""
    from hosts.agent.service import ping
    from hosts.models import Host

    w = one_vm(ha=False)
    w.advance_to(10)
    confirmed = vm("vm1").power_state_update_time
    assert confirmed == at(w, 10)
    ping(Host.objects.get(name="h1"), [("vm1", PowerState.POWER_ON)],
         now=confirmed - dt.timedelta(seconds=3))
    assert vm("vm1").power_state_update_time == confirmed
