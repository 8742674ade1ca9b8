"""Host liveness (SPEC R2–R7): the monitor sweep, investigation of hosts behind on
ping, and what follows each verdict — driven through the real engine on a simulated
fleet with virtual time (fleet.testing.world). Assertions are about what an operator
sees: host statuses, events and alerts, HA work, VM states, and which hosts the
server asked what (w.fleet.calls)."""

import datetime as dt

import pytest

from fleet.testing import world
from hadash.choices import Reason, Step, WorkType
from hadash.models import Alert, Event, HaWork
from hosts.agent.service import ConnectData, connect, disconnect
from hosts.choices import HostStatus, ResourceState
from hosts.models import Host
from vms.choices import VmState
from vms.models import VMInstance

pytestmark = pytest.mark.django_db

TWO_HOSTS = {"hosts": {"h1": {}, "h2": {}}, "vms": {"vm1": {"host": "h1", "ha": True}}}


# --- helpers -------------------------------------------------------------------------

def host(name):
    return Host.objects.get(name=name)


def vm(name):
    return VMInstance.objects.select_related("host", "last_host").get(name=name)


def at(w, t):
    """The virtual time of second ``t``."""
    return w.clock.epoch + dt.timedelta(seconds=t)


def about(call):
    """The host a server→agent/BMC call is about (for check-on-host: the target)."""
    return call[2] if call[0] == "check-on-host" else call[1]


def asked_about(w, name):
    return [c for c in w.fleet.calls if about(c) == name]


def health_checks(w, name):
    return [c for c in w.fleet.calls if c == ("check-health", name)]


def neighbour_asks(w, name):
    return [c for c in w.fleet.calls if c[0] == "check-on-host" and c[2] == name]


def status_events(name, to=None):
    qs = Event.objects.filter(subject="host", subject_name=name, field="status")
    if to is not None:
        qs = qs.filter(new=to)
    return list(qs.order_by("id"))


def ha_items(name=None):
    qs = HaWork.objects.filter(type=WorkType.HA)
    if name is not None:
        qs = qs.filter(instance__name=name)
    return list(qs.order_by("id"))


def restarts(name):
    return Event.objects.filter(vm__name=name, event="HaStarted").count()


def investigated_at(w, name, until):
    """Run the world up to ``until`` and return the seconds at which the server sent
    ``name`` a health check (the first step of every investigation, R4)."""
    seen = []
    for t in range(getattr(w, "t", -1) + 1, until + 1):
        n = len(w.fleet.calls)
        w.advance_to(t)
        if ("check-health", name) in w.fleet.calls[n:]:
            seen.append(t)
    return seen


def drop_pings(w, name):
    """Lose ``name``'s pings on the way (its agent keeps answering direct calls):
    while the runner sends pings the host looks cut off, at any other moment it is
    reachable. Only the test harness is wrapped, never the engine."""
    send = w.pings

    def pings(t):
        h = w.fleet.host(name)
        saved, h.network_on = h.network_on, False
        try:
            send(t)
        finally:
            h.network_on = saved

    w.pings = pings


def connect_host(w, name, type="Routing", cluster="infra"):
    """A host whose agent connects once (at the current virtual time) and then never
    pings: it is not in the simulated fleet."""
    h, _ = connect(ConnectData(
        name=name, type=type, hypervisor="KVM", cluster=cluster, cpus=8, memory_mb=16384,
        address=f"10.9.0.{len(name)}", agent_url=f"sim://{name}",
    ), now=w.clock.now())
    return h


# --- R2: the monitor sweep ----------------------------------------------------------

@pytest.mark.parametrize(
    "interval,off_at,last_ping,detect",
    [(10, 15, 10, 36), (4, 9, 8, 19)],
    ids=["interval10", "interval4"],
)
def test_r2_powered_off_host_is_up_until_interval_times_timeout_then_investigated(
    interval, off_at, last_ping, detect
):
    """R2: a host is behind on ping when now − last_ping > ping.interval × ping.timeout;
    until then it stays Up and nobody asks about it; the sweep (every second) picks it
    up at the first second after, so detection takes at most interval×timeout + 1 s."""
    w = world({"config": {"ping.interval": interval, "ping.timeout": 2.5},
               "hosts": {"h1": {}, "h2": {}}})
    w.advance_to(off_at)
    w.apply("host h1 power off")
    w.advance_to(detect - 1)  # = last_ping + interval × timeout
    h1 = host("h1")
    assert h1.last_ping == at(w, last_ping)
    assert h1.status == HostStatus.UP
    assert asked_about(w, "h1") == []
    w.advance_to(detect)
    assert health_checks(w, "h1") == [("check-health", "h1")]
    assert host("h1").status == HostStatus.DOWN
    assert detect - last_ping <= interval * 2.5 + 1


def test_r2_traffic_monitor_and_secondary_storage_hosts_are_never_swept():
    """R2: hosts of type TrafficMonitor and SecondaryStorage are never watched: however
    long they stay silent they remain Up and are never health-checked — while a Routing
    host connected the same way is."""
    w = world({"hosts": {"h1": {}}})
    connect_host(w, "tm1", type="TrafficMonitor")
    connect_host(w, "ss1", type="SecondaryStorage")
    connect_host(w, "rt1", type="Routing")
    w.advance_to(120)
    for name in ("tm1", "ss1"):
        assert asked_about(w, name) == []
        assert host(name).status == HostStatus.UP
        assert [e.new for e in status_events(name)] == ["Connecting", "Up"]
    assert health_checks(w, "rt1"), "control: a silent Routing host is swept"
    assert health_checks(w, "rt1")[0] == ("check-health", "rt1")


def test_r2_down_and_disconnected_hosts_are_not_swept():
    """R2: Disconnected and Down hosts are not swept: once h1 is Down and h2 is
    Disconnected, nobody asks them anything any more and their status stays."""
    w = world({"hosts": {"h1": {}, "h2": {}, "h3": {}}})
    w.advance_to(5)
    w.apply("host h1 power off")
    w.fleet.agent_stop("h2")
    disconnect(host("h2"), "agent shutting down", now=w.clock.now())
    w.advance_to(26)
    assert host("h1").status == HostStatus.DOWN
    assert host("h2").status == HostStatus.DISCONNECTED
    asked_h1 = len(asked_about(w, "h1"))
    w.advance_to(200)
    assert len(asked_about(w, "h1")) == asked_h1
    assert asked_about(w, "h2") == []
    assert host("h1").status == HostStatus.DOWN
    assert host("h2").status == HostStatus.DISCONNECTED
    assert len(status_events("h1", to="Down")) == 1


def test_r2_r4_connecting_host_behind_on_ping_is_swept_and_its_health_check_brings_it_up():
    """R2: Connecting hosts are swept like Up ones; R4: the agent answers its health
    check, so the pings were lost — the host is kept and becomes Up."""
    w = world(TWO_HOSTS)
    Host.objects.filter(name="h1").update(status=HostStatus.CONNECTING)
    drop_pings(w, "h1")
    w.advance_to(25)
    assert host("h1").status == HostStatus.CONNECTING
    assert health_checks(w, "h1") == []
    w.advance_to(26)
    assert health_checks(w, "h1") == [("check-health", "h1")]
    h1 = host("h1")
    assert h1.status == HostStatus.UP
    assert h1.last_ping == at(w, 26)
    last = status_events("h1")[-1]
    assert (last.old, last.new) == ("Connecting", "Up")
    assert ha_items() == []


# --- R3: no investigation -------------------------------------------------------------

def _disable(w):
    w.apply("host h1 disable")


def _maintenance(w):
    # R15 with the real action: vm1 migrates to h2, then h1 is in Maintenance.
    w.apply("host h1 maintenance")
    w.advance_to(w.t + 1)


def _error_in_maintenance(w):
    host("h1").set_resource_state(ResourceState.ERROR_IN_MAINTENANCE, now=w.clock.now())


@pytest.mark.parametrize(
    "resource_state,make",
    [
        (ResourceState.DISABLED, _disable),
        (ResourceState.MAINTENANCE, _maintenance),
        (ResourceState.ERROR_IN_MAINTENANCE, _error_in_maintenance),
    ],
    ids=["Disabled", "Maintenance", "ErrorInMaintenance"],
)
def test_r3_disabled_or_maintenance_host_is_disconnected_without_investigation(
    resource_state, make
):
    """R3: a behind host that is Disabled, in Maintenance or ErrorInMaintenance goes
    Disconnected with event ShutdownRequested; nobody is asked about it (no health
    check, no neighbour, no fence) and no HA follows."""
    w = world(TWO_HOSTS)
    w.advance_to(4)
    make(w)
    assert host("h1").resource_state == resource_state
    before = len(w.fleet.calls)
    w.apply("host h1 power off")  # last ping at t=0
    w.advance_to(25)
    assert host("h1").status == HostStatus.UP
    w.advance_to(26)
    h1 = host("h1")
    assert h1.status == HostStatus.DISCONNECTED
    assert h1.resource_state == resource_state
    ev = status_events("h1")[-1]
    assert (ev.event, ev.old, ev.new) == ("ShutdownRequested", "Up", "Disconnected")
    w.advance_to(150)
    assert [c for c in w.fleet.calls[before:] if about(c) == "h1"] == []
    assert host("h1").status == HostStatus.DISCONNECTED
    assert ha_items() == []
    assert restarts("vm1") == 0


@pytest.mark.parametrize(
    "host_type", ["ConsoleProxy", "SecondaryStorageVM", "SecondaryStorageCmdExecutor"]
)
def test_r3_system_vm_host_types_are_disconnected_without_investigation(host_type):
    """R3: a behind host of type ConsoleProxy, SecondaryStorageVM or
    SecondaryStorageCmdExecutor goes Disconnected (ShutdownRequested) without being
    asked anything, and no HA follows for a VM on it."""
    from hadash.ha import actions

    w = world({"hosts": {"h1": {}, "h2": {}}})
    connect_host(w, "sys1", type=host_type, cluster="c1")
    actions.register_vm(name="vmx", host_name="sys1", cpus=1, memory_mb=512, ha_enabled=True,
                        now=w.clock.now())
    w.advance_to(25)
    assert host("sys1").status == HostStatus.UP
    w.advance_to(26)
    assert host("sys1").status == HostStatus.DISCONNECTED
    ev = status_events("sys1")[-1]
    assert (ev.event, ev.old, ev.new) == ("ShutdownRequested", "Up", "Disconnected")
    w.advance_to(120)
    assert asked_about(w, "sys1") == []
    assert ha_items() == []
    assert vm("vmx").state == VmState.RUNNING


# --- R4: investigation ------------------------------------------------------------------

def test_r4_agent_answers_health_check_host_stays_up_and_last_ping_is_refreshed():
    """R4: pings are lost but the agent answers its direct health check → the host is
    kept Up, last_ping is refreshed (so it is not behind again for another
    interval×timeout), no investigator is asked and no HA work appears."""
    w = world(TWO_HOSTS)
    drop_pings(w, "h1")
    w.advance_to(25)
    assert health_checks(w, "h1") == []
    w.advance_to(26)
    h1 = host("h1")
    assert h1.status == HostStatus.UP
    assert h1.last_ping == at(w, 26)
    assert health_checks(w, "h1") == [("check-health", "h1")]
    assert neighbour_asks(w, "h1") == []
    assert ("fence", "h1") not in w.fleet.calls
    assert [e.new for e in status_events("h1")] == ["Connecting", "Up"]
    assert investigated_at(w, "h1", 60) == [52]  # behind again only after 26 + 25
    assert ha_items() == []
    v = vm("vm1")
    assert (v.state, v.host.name) == (VmState.RUNNING, "h1")


def test_r4_r5_neighbour_sees_host_alive_host_goes_alert_and_vms_are_untouched():
    """R4 Neighbour: the agent is stopped but the machine runs, so a neighbour says it
    is alive → R5: alert, status Alert, its VMs untouched (no HA, no fence, still
    Running where they were)."""
    w = world({"hosts": {"h1": {}, "h2": {}},
               "vms": {"vm1": {"host": "h1", "ha": True}, "vm2": {"host": "h1"}}})
    w.advance_to(5)
    w.apply("host h1 agent stop")
    w.advance_to(26)
    assert host("h1").status == HostStatus.ALERT
    ev = status_events("h1")[-1]
    assert (ev.event, ev.old, ev.new, ev.severity) == ("AgentDisconnected", "Up", "Alert",
                                                       "warning")
    # R18/R19: h1's incident stays open; its one alert says why nothing is restarted.
    [alert] = Alert.objects.all()
    assert alert.state == "open" and alert.incident.state == "Open"
    assert alert.title.startswith("h1 unreachable: alive (Neighbour)")
    assert ("check-health", "h1") in w.fleet.calls
    assert ("check-on-host", "h2", "h1") in w.fleet.calls
    w.advance_to(80)
    assert ("fence", "h1") not in w.fleet.calls
    assert ha_items() == []
    for name in ("vm1", "vm2"):
        v = vm(name)
        assert (v.state, v.host.name) == (VmState.RUNNING, "h1")
        assert w.fleet.where(name) == ["h1"]
    assert host("h1").status == HostStatus.ALERT


def test_r4_neighbour_sees_host_dead_host_goes_down():
    """R4 Neighbour: a neighbour of the same cluster sees the machine dead → Down
    (decided by Neighbour). Hosts of another cluster are not asked."""
    w = world({"hosts": {"h1": {}, "h2": {}, "h3": {}, "x1": {"cluster": "c2"}}})
    w.advance_to(5)
    w.apply("host h1 power off")
    w.advance_to(26)
    assert host("h1").status == HostStatus.DOWN
    ev = status_events("h1")[-1]
    assert (ev.event, ev.old, ev.new, ev.reason, ev.severity) == (
        "HostDown", "Up", "Down", "Neighbour", "critical")
    asks = neighbour_asks(w, "h1")
    assert asks and {c[1] for c in asks} <= {"h2", "h3"}
    assert w.fleet.calls.index(("check-health", "h1")) < w.fleet.calls.index(asks[0])


def test_r4_out_of_band_only_bmc_says_off_host_goes_down():
    """R4: ha.investigators.order = OutOfBand: after the direct health check fails the
    BMC is asked; it reports Off → Down, decided by OutOfBand — which R27 counts as
    fenced (no ForceOff); no neighbour is asked."""
    w = world({"config": {"ha.investigators.order": "OutOfBand"},
               "hosts": {"h1": {}, "h2": {}}})
    w.advance_to(5)
    w.apply("host h1 power off")
    w.advance_to(26)
    assert host("h1").status == HostStatus.DOWN
    ev = status_events("h1")[-1]
    assert (ev.event, ev.reason) == ("HostDown", "fenced: BMC reports power Off")
    assert ("fence", "h1") not in w.fleet.calls
    assert ("check-health", "h1") in w.fleet.calls
    assert neighbour_asks(w, "h1") == []


@pytest.mark.parametrize(
    "order,faults",
    [
        ("CheckOnAgent,OutOfBand", ["bmc h1 fail", "host h1 power off"]),
        ("OutOfBand", ["host h1 agent stop"]),
    ],
    ids=["bmc-unreachable", "bmc-says-on"],
)
def test_r4_r5_undeterminable_host_is_retried_every_sweep_then_alert_after_alert_wait(
    order, faults
):
    """R4/R5: with Neighbour left out of ha.investigators.order and a BMC that cannot
    tell (unreachable, or On) the verdict is unknown: the host stays Up, is investigated
    again every sweep, and once last_ping is older than alert.wait it goes Alert (with an
    alert). From then on it is investigated every investigate.retry.interval. No HA."""
    w = world({"config": {"ha.investigators.order": order, "alert.wait": 60},
               "hosts": {"h1": {}, "h2": {}}, "vms": {"vm1": {"host": "h1", "ha": True}}})
    w.advance_to(5)
    for do in faults:
        w.apply(do)
    assert investigated_at(w, "h1", 60) == list(range(26, 61))
    assert host("h1").status == HostStatus.UP
    w.advance_to(61)  # last_ping (t=0) is now older than alert.wait
    assert host("h1").status == HostStatus.ALERT
    ev = status_events("h1")[-1]
    assert (ev.event, ev.old, ev.new, ev.severity) == ("WaitedTooLong", "Up", "Alert",
                                                       "warning")
    [alert] = Alert.objects.all()
    assert alert.state == "open" and "undeterminable" in alert.title
    assert investigated_at(w, "h1", 125) == [121]  # 61 + investigate.retry.interval
    assert neighbour_asks(w, "h1") == []
    assert host("h1").status == HostStatus.ALERT
    assert ha_items() == []


# --- R5: outcomes -------------------------------------------------------------------------

def test_r5_down_host_alerts_and_every_vm_on_it_gets_an_ha_item():
    """R5: Down → event HostDown (critical), status Down, and every VM on the host is
    scheduled (HA-enabled or not), with one event and one alert (the incident's, R19)
    naming the HA VMs. HA VMs are restarted elsewhere; the non-HA VM stays Stopped;
    VMs on other hosts are untouched."""
    w = world({
        "hosts": {"h1": {}, "h2": {}, "h3": {}},
        "vms": {"ha1": {"host": "h1", "ha": True},
                "ha2": {"host": "h1", "ha": True, "priority": "high"},
                "plain": {"host": "h1"},
                "other": {"host": "h2", "ha": True}},
    })
    w.advance_to(5)
    w.apply("host h1 power off")
    w.advance_to(26)
    assert host("h1").status == HostStatus.DOWN
    down = [e for e in status_events("h1") if e.event == "HostDown"]
    assert len(down) == 1 and down[0].severity == "critical"
    items = ha_items()
    assert sorted(i.instance.name for i in items) == ["ha1", "ha2", "plain"]
    assert {i.reason for i in items} == {Reason.HOST_DOWN}
    assert {i.host.name for i in items} == {"h1"}
    assert {i.step for i in items} == {Step.DONE}
    scheduled = Event.objects.filter(event="HaScheduled")
    assert scheduled.count() == 1
    [alert] = Alert.objects.all()
    assert "ha1" in alert.message and "ha2" in alert.message
    named = scheduled[0].message.split("restart:")[1]
    assert "ha1" in named and "ha2" in named and "plain" not in named
    for name in ("ha1", "ha2"):
        v = vm(name)
        assert v.state == VmState.RUNNING and v.host.name in ("h2", "h3")
        assert restarts(name) == 1
    plain = vm("plain")
    assert (plain.state, plain.host, plain.last_host.name) == (VmState.STOPPED, None, "h1")
    other = vm("other")
    assert (other.state, other.host.name, restarts("other")) == (VmState.RUNNING, "h2", 0)
    assert w.result.violations == []


def test_r5_alert_host_is_reinvestigated_every_retry_interval_and_goes_down_when_dead():
    """R5 (improvement over CloudStack #12088): a host in Alert is investigated again
    every investigate.retry.interval; when it is later found dead (agent stopped, then
    the machine powers off) the Down branch runs and its HA VM is restarted."""
    w = world({"config": {"investigate.retry.interval": 30},
               "hosts": {"h1": {}, "h2": {}, "h3": {}},
               "vms": {"vm1": {"host": "h1", "ha": True}}})
    w.advance_to(5)
    w.apply("host h1 agent stop")
    assert investigated_at(w, "h1", 70) == [26, 56]
    assert host("h1").status == HostStatus.ALERT
    assert ha_items() == []
    w.apply("host h1 power off")
    assert investigated_at(w, "h1", 90) == [86]
    assert host("h1").status == HostStatus.DOWN
    ev = status_events("h1")[-1]
    assert (ev.event, ev.old, ev.new, ev.severity) == ("HostDown", "Alert", "Down",
                                                       "critical")
    # R18: one story from the first missed ping to the restart.
    [alert] = Alert.objects.all()
    assert alert.incident.state == "Resolved" and alert.state == "resolved"
    [item] = ha_items("vm1")
    assert (item.reason, item.step) == (Reason.HOST_DOWN, Step.DONE)
    v = vm("vm1")
    assert v.state == VmState.RUNNING and v.host.name in ("h2", "h3")
    assert w.fleet.where("vm1") == [v.host.name]
    assert restarts("vm1") == 1


# --- R6: coming back ----------------------------------------------------------------------

def test_r6_alert_host_that_pings_again_is_up_with_its_vms_untouched():
    """R6: a host in Alert (network cut, neighbours see it alive) that pings again
    returns to Up; its VMs were never touched."""
    w = world(TWO_HOSTS)
    w.advance_to(5)
    w.apply("host h1 network off")
    w.advance_to(26)
    assert host("h1").status == HostStatus.ALERT
    w.advance_to(30)
    w.apply("host h1 network on")
    w.advance_to(39)
    assert host("h1").status == HostStatus.ALERT
    w.advance_to(40)  # the next ping
    assert host("h1").status == HostStatus.UP
    ev = status_events("h1")[-1]
    assert (ev.event, ev.old, ev.new) == ("Ping", "Alert", "Up")
    v = vm("vm1")
    assert (v.state, v.host.name) == (VmState.RUNNING, "h1")
    assert ha_items() == []
    w.advance_to(100)
    assert host("h1").status == HostStatus.UP


def test_r6_down_host_that_powers_on_is_up_and_its_vm_does_not_run_twice():
    """R6: a Down host whose VM was restarted elsewhere powers on again: it comes back
    Up, the VM keeps running only on its new host, HA does not act again."""
    w = world(TWO_HOSTS)
    w.advance_to(5)
    w.apply("host h1 power off")
    w.advance_to(26)
    assert vm("vm1").host.name == "h2"
    w.advance_to(40)
    w.apply("host h1 power on")
    assert host("h1").status == HostStatus.UP
    w.advance_to(80)
    assert host("h1").status == HostStatus.UP
    v = vm("vm1")
    assert (v.state, v.host.name) == (VmState.RUNNING, "h2")
    assert w.fleet.where("vm1") == ["h2"]
    assert restarts("vm1") == 1
    assert len(ha_items("vm1")) == 1
    assert w.result.violations == []


@pytest.mark.parametrize("how", ["reconnect", "ping"])
def test_r6_host_reporting_a_vm_that_runs_elsewhere_gets_it_stopped(how):
    """R6 (improvement: never two copies): a host that reports PowerOn for a VM that HA
    meanwhile restarted elsewhere is told to stop it (ForceStop work on that host); the
    VM's record stays on its new host and it never runs on two hosts."""
    w = world(TWO_HOSTS)
    w.advance_to(5)
    w.apply("host h1 power off")
    w.advance_to(26)
    assert vm("vm1").host.name == "h2"
    if how == "reconnect":
        # h1 boots and its hypervisor brings the old vm1 back; the agent reconnects.
        w.advance_to(40)
        w.fleet.power_on("h1")
        w.fleet.host("h1").vms["vm1"] = "PowerOn"
        w.connect("h1")
        w.advance_to(41)
    else:
        w.advance_to(40)
        w.apply("host h1 power on")
        w.advance_to(49)
        w.fleet.host("h1").vms["vm1"] = "PowerOn"  # a stray copy appears on h1
        w.advance_to(50)  # h1's next ping reports it
    assert ("stop", "h1", "vm1") in w.fleet.calls
    assert ("stop", "h2", "vm1") not in w.fleet.calls
    assert w.fleet.where("vm1") == ["h2"]
    [stop] = HaWork.objects.filter(instance__name="vm1", type=WorkType.FORCE_STOP)
    assert (stop.host.name, stop.step) == ("h1", Step.DONE)
    v = vm("vm1")
    assert (v.state, v.host.name, v.power_host.name) == (VmState.RUNNING, "h2", "h2")
    assert host("h1").status == HostStatus.UP
    assert len(ha_items("vm1")) == 1
    assert w.result.violations == []


# --- R7: goodbye ---------------------------------------------------------------------------

def test_r7_agent_disconnect_is_disconnected_without_investigation_or_ha():
    """R7: an agent that says goodbye goes ShutdownRequested → Disconnected; it is never
    investigated and no HA follows, however long it stays away. R6: when its agent
    connects again it is Up."""
    w = world(TWO_HOSTS)
    w.advance_to(5)
    w.fleet.agent_stop("h1")
    disconnect(host("h1"), "agent shutting down", now=w.clock.now())
    assert host("h1").status == HostStatus.DISCONNECTED
    ev = status_events("h1")[-1]
    assert (ev.event, ev.old, ev.new, ev.reason) == (
        "ShutdownRequested", "Up", "Disconnected", "agent shutting down")
    w.advance_to(150)
    assert asked_about(w, "h1") == []
    assert host("h1").status == HostStatus.DISCONNECTED
    assert ha_items() == []
    v = vm("vm1")
    assert (v.state, v.host.name) == (VmState.RUNNING, "h1")
    w.apply("host h1 agent start")
    assert host("h1").status == HostStatus.UP


def test_r6_r7_disconnected_host_that_pings_again_is_up():
    """R6: a host Disconnected by its agent's goodbye that pings again is Up."""
    w = world(TWO_HOSTS)
    w.advance_to(5)
    disconnect(host("h1"), "restart", now=w.clock.now())
    assert host("h1").status == HostStatus.DISCONNECTED
    w.advance_to(10)
    assert host("h1").status == HostStatus.UP
    ev = status_events("h1")[-1]
    assert (ev.event, ev.old, ev.new) == ("Ping", "Disconnected", "Up")
    assert ha_items() == []


def test_r2_detection_is_one_ping_timeout_event_per_episode():
    """R2/R4: the moment a host is found behind on ping is recorded once (the incident's
    "detected"), even though an undeterminable host is investigated every sweep."""
    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {},
               "config": {"ha.investigators.order": "CheckOnAgent,OutOfBand"}})
    w.apply("host h1 network off")  # undeterminable: BMC says On, no neighbours asked
    w.advance_to(60)
    timeouts = Event.objects.filter(host__name="h1", event="PingTimeout")
    assert timeouts.count() == 1
    assert timeouts[0].time == w.clock.epoch + dt.timedelta(seconds=26)
    assert "no ping for 26 s" in timeouts[0].message
    assert len([c for c in w.fleet.calls if c == ("check-health", "h1")]) >= 30
    # Back, then gone again: a new episode, a new event.
    w.apply("host h1 network on")
    w.advance_to(70)
    w.apply("host h1 network off")
    w.advance_to(100)
    assert timeouts.count() == 2


def test_r2_next_falls_behind_is_the_moment_the_oldest_on_time_host_goes_behind():
    """R2 in production: between one-second sweeps the sweeper wakes exactly when the
    next host falls behind. That moment is the oldest last ping among watched hosts
    still on time + interval × timeout; hosts already behind, not swept (Down), or
    unwatched (traffic monitor) do not count; a host that pinged after its last
    investigation counts (a ping ends an episode)."""
    from hadash import config
    from hosts.liveness import hosts_to_investigate, next_falls_behind

    w = world({"config": {"ping.interval": 2, "ping.timeout": 2.5},
               "hosts": {"h1": {}, "h2": {}, "h3": {}}})
    connect_host(w, "tm1", type="TrafficMonitor")
    now = w.clock.now()
    cfg = config.snapshot()
    Host.objects.filter(name="h1").update(last_ping=now - dt.timedelta(seconds=3))
    # h2 had an investigation once, and has pinged since: that episode is over.
    Host.objects.filter(name="h2").update(last_ping=now - dt.timedelta(seconds=1),
                                          next_investigation=now - dt.timedelta(seconds=9))
    Host.objects.filter(name="h3").update(status=HostStatus.DOWN,
                                          last_ping=now - dt.timedelta(seconds=4))
    Host.objects.filter(name="tm1").update(last_ping=now - dt.timedelta(seconds=4.5))
    assert next_falls_behind(now, cfg) == now + dt.timedelta(seconds=2)  # h1: 5 − 3
    later = now + dt.timedelta(seconds=2, milliseconds=1)
    assert "h1" in [h.name for h in hosts_to_investigate(later, cfg, newly_behind=True)]
    assert next_falls_behind(later, cfg) == now + dt.timedelta(seconds=4)  # h2 next
    assert [h.name for h in hosts_to_investigate(now + dt.timedelta(seconds=4.001), cfg,
                                                 newly_behind=True)] == ["h1", "h2"]
    # An episode under way is not "newly behind" again, nor counted as on time.
    Host.objects.filter(name="h1").update(next_investigation=later)
    assert hosts_to_investigate(later, cfg, newly_behind=True) == []
    Host.objects.filter(name__in=["h2"]).update(status=HostStatus.DOWN)
    assert next_falls_behind(later, cfg) is None


def test_r2_host_that_pinged_before_its_investigation_began_is_left_alone():
    """R2 under load: the sweep found h1 behind, but its investigation waited for an
    investigator and h1 pinged meanwhile. It is on time: no PingTimeout, nobody is
    asked about it, and it is free to be found behind again at once."""
    from hadash import config
    from hosts.liveness import check_host, hosts_to_investigate

    w = world({"config": {"ping.interval": 2, "ping.timeout": 2.5},
               "hosts": {"h1": {}, "h2": {}}})
    w.advance_to(3)
    w.fleet.agent_stop("h1")
    now = host("h1").last_ping + dt.timedelta(seconds=6)
    cfg = config.snapshot()
    [found] = [h for h in hosts_to_investigate(now, cfg) if h.name == "h1"]
    Host.objects.filter(name="h1").update(last_ping=now - dt.timedelta(seconds=0.2))
    w.fleet.calls.clear()
    assert check_host(w.engine, found, now=now, cfg=cfg) is False
    assert asked_about(w, "h1") == []
    assert not Event.objects.filter(subject_name="h1", event="PingTimeout").exists()
    assert host("h1").next_investigation is None


def test_r2_a_ping_during_the_investigation_ends_the_episode_and_its_claim():
    """R2/R4: h1's agent is silent but answers its health check late — by then a ping
    has arrived. The health check's write gives way to the ping, and the host's claim
    is dropped, so should it fall behind again the very next sweep investigates it
    (instead of waiting out the one-minute investigation lease)."""
    from hadash import config
    from hosts.liveness import check_host, hosts_to_investigate

    w = world({"config": {"ping.interval": 2, "ping.timeout": 2.5},
               "hosts": {"h1": {}, "h2": {}}})
    w.advance_to(3)
    w.fleet.agent_stop("h1")  # no pings; the health check below is answered by hand
    now = host("h1").last_ping + dt.timedelta(seconds=6)
    cfg = config.snapshot()
    [found] = [h for h in hosts_to_investigate(now, cfg) if h.name == "h1"]
    pinged = now + dt.timedelta(seconds=0.5)

    def health_check_answered_after_a_ping(h):
        Host.objects.filter(pk=h.pk).update(last_ping=pinged)
        return True

    w.engine.agents.check_health = health_check_answered_after_a_ping
    assert check_host(w.engine, found, now=now, cfg=cfg) is False
    h1 = host("h1")
    assert (h1.status, h1.last_ping, h1.next_investigation) == (HostStatus.UP, pinged, None)
    later = pinged + dt.timedelta(seconds=5.1)
    assert "h1" in [h.name for h in hosts_to_investigate(later, cfg, newly_behind=True)]
