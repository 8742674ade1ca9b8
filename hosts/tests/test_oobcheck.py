"""Fencing evidence (SPEC R27) and BMC checks (SPEC R28): through the real engine on a
simulated fleet with virtual time (fleet.testing.world), and the Redfish check against
a real BMC (sushy-emulator, as hosts/tests/test_redfish.py)."""

import threading

import pytest

from fleet.sim import SimOobClient
from fleet.testing import world
from hadash.choices import Reason, Step
from hadash.ha.oobcheck import BmcChecker
from hadash.models import Alert, Event, HaWork, Incident
from hosts.hastatus import BMC_CHECK_ALERT
from hosts.models import Host
from hosts.redfish import RedfishClient
from hosts.tests.test_redfish import bmc, free_port, redfish  # noqa: F401 (fixtures)
from vms import hastatus
from vms.models import VMInstance

THREE = {
    "hosts": {"h1": {}, "h2": {}, "h3": {}},
    "vms": {"vm1": {"host": "h1", "ha": True}, "vm2": {"host": "h2", "ha": True}},
}


def vm(name):
    return VMInstance.objects.select_related("host").get(name=name)


def bmc_alerts(state="open"):
    return sorted(Alert.objects.filter(kind=BMC_CHECK_ALERT, state=state)
                  .values_list("subject_name", flat=True))


# --- R27 ------------------------------------------------------------------------------

@pytest.mark.django_db
def test_r27_bmc_power_off_verdict_counts_as_fenced_without_force_off():
    """R27: a host whose BMC reports power Off is Down and counts as fenced: the
    incident has fenced_at, a Fenced event says why, and no ForceOff is sent."""
    w = world({**THREE, "config": {"ha.investigators.order": "CheckOnAgent,OutOfBand"}})
    w.advance_to(15)
    w.fleet.power_off("h1")
    w.advance_to(90)
    assert Host.objects.get(name="h1").status == "Down"
    assert ("fence", "h1") not in w.fleet.calls
    inc = Incident.objects.get(host_name="h1")
    assert inc.fenced_at is not None and inc.fenced_at <= inc.declared_at
    fenced = Event.objects.get(event="HostFenced", host__name="h1")
    assert "BMC reports power Off" in fenced.message and fenced.incident == inc
    assert "BMC reports power Off" in Event.objects.get(event="HostDown").reason
    assert vm("vm1").state == "Running" and vm("vm1").host.name != "h1"


@pytest.mark.django_db
def test_r27_fencing_a_host_whose_bmc_reports_off_sends_no_force_off():
    """R27 in the HA item's fencing step: the BMC already reports Off, so the host is
    fenced without a ForceOff and the VM restarted."""
    w = world(THREE)
    w.advance_to(15)
    w.fleet.network("h1", False)  # cut off: the VM's fate is unknown → fence
    w.fleet.bmc_reports_off("h1")  # its BMC reports power Off
    w.fleet.host("h1").vms.clear()  # (and the machine runs no VM any more)
    HaWork.objects.schedule_restart(vm("vm1"), investigate=True, reason=Reason.VM_POWER_OFF,
                                    now=w.clock.now())
    w.advance_to(17)
    assert ("fence", "h1") not in w.fleet.calls
    assert HaWork.objects.get(instance__name="vm1").step == Step.DONE
    assert Host.objects.get(name="h1").status == "Down"
    ev = Event.objects.get(event="HostFenced", host__name="h1")
    assert "no ForceOff" in ev.message
    assert vm("vm1").state == "Running" and vm("vm1").host.name != "h1"


# --- R28 ------------------------------------------------------------------------------

@pytest.mark.django_db
def test_r28_failing_bmc_is_one_alert_per_host_and_its_vms_at_risk_until_it_passes():
    """R28: a BMC that stops answering fails its next check: one alert for its host
    (however many checks fail), its HA VMs at-risk; fixed, the alert resolves."""
    w = world({**THREE, "config": {"oob.check.interval": 30}})
    w.advance_to(40)
    assert bmc_alerts() == []
    assert hastatus.status_of(vm("vm1"), now=w.clock.now()).code == "protected"
    w.fleet.bmc("h1", False)
    w.advance_to(140)  # three rounds
    assert bmc_alerts() == ["h1"]
    alert = Alert.objects.get(kind=BMC_CHECK_ALERT)
    assert alert.count >= 2 and "unreachable" in alert.title
    status = hastatus.status_of(vm("vm1"), now=w.clock.now())
    assert status.code == "at-risk" and "BMC check of h1 fails" in status.reason
    assert hastatus.status_of(vm("vm2"), now=w.clock.now()).code == "protected"
    assert not Incident.objects.exists()  # before any incident
    w.fleet.bmc("h1", True)
    w.advance_to(180)
    assert bmc_alerts() == [] and bmc_alerts("resolved") == ["h1"]
    assert hastatus.status_of(vm("vm1"), now=w.clock.now()).code == "protected"


@pytest.mark.django_db
def test_r28_checks_are_spread_over_the_interval():
    """R28: the hosts' checks are not all at one second of the interval."""
    spec = {"hosts": {f"h{i}": {} for i in range(1, 9)}, "config": {"oob.check.interval": 60}}
    w = world(spec)
    w.advance_to(59)
    seconds = set()
    for t in range(60, 120):
        before = len(w.fleet.calls)
        w.advance_to(t)
        if any(c[0] == "bmc-check" for c in w.fleet.calls[before:]):
            seconds.add(t)
    assert len(seconds) > 1
    checked = [c[1] for c in w.fleet.calls if c[0] == "bmc-check"]
    assert set(checked) == {f"h{i}" for i in range(1, 9)}


@pytest.mark.django_db
def test_r28_bmc_reporting_off_alerts_only_for_a_host_that_keeps_running():
    """R28: power Off reported for a host that keeps pinging is a failed check; a host
    that really lost power is its incident's business, not a BMC alert."""
    w = world({**THREE, "config": {"oob.check.interval": 30}})
    w.advance_to(15)
    w.fleet.bmc_reports_off("h2")  # h2 keeps running and pinging
    w.fleet.power_off("h3")  # h3 really loses power
    w.advance_to(150)
    assert bmc_alerts() == ["h2"]
    assert "power Off" in Alert.objects.get(kind=BMC_CHECK_ALERT).title
    assert Host.objects.get(name="h3").status == "Down"


@pytest.mark.django_db
def test_r28_hosts_without_a_bmc_are_not_checked():
    """R28: no BMC configured, no check (its HA status says so already)."""
    w = world({**THREE, "config": {"oob.check.interval": 30}})
    Host.objects.filter(name="h1").update(oobm_enabled=False)
    w.advance_to(100)
    checked = {c[1] for c in w.fleet.calls if c[0] == "bmc-check"}
    assert checked == {"h2", "h3"} and bmc_alerts() == []
    status = hastatus.status_of(vm("vm1"), now=w.clock.now())
    assert status.code == "at-risk" and "no BMC configured" in status.reason


class StuckBmcs(SimOobClient):
    """BMCs whose checks hang until released (a BMC that does not answer)."""

    def __init__(self, fleet):
        super().__init__(fleet)
        self.release = threading.Event()
        self.started = threading.Semaphore(0)

    def check_bmc(self, host):
        self.started.release()
        self.release.wait(30)
        return super().check_bmc(host)


@pytest.mark.django_db(transaction=True)
def test_r28_a_hanging_bmc_never_blocks_the_sweep():
    """R28: with an executor (production), the round hands the checks to it and
    returns while they hang; a host is never checked twice at once."""
    from concurrent.futures import ThreadPoolExecutor

    w = world({"hosts": {"h1": {}}, "config": {"oob.check.interval": 10}})
    stuck = StuckBmcs(w.fleet)
    w.engine.oob = stuck
    checker = BmcChecker(ThreadPoolExecutor(2))
    from hadash import config

    cfg = config.snapshot()
    later = w.clock.now()
    import datetime as dt

    for s in range(0, 40, 5):  # the sweep goes on, round after round
        checker.run_due(w.engine, now=later + dt.timedelta(seconds=s), cfg=cfg)
    assert stuck.started.acquire(timeout=10)  # the one check started, and hangs
    assert not stuck.started.acquire(timeout=0.5)  # and was not started twice
    assert checker.in_flight == {Host.objects.get(name="h1").pk}
    stuck.release.set()
    checker.executor.shutdown(wait=True)
    assert checker.in_flight == set()


# --- Redfish (a real BMC) ----------------------------------------------------------------

def test_r28_redfish_check_against_a_real_bmc(bmc, redfish):  # noqa: F811
    """R28 over Redfish: passes for a system that is On; says why otherwise."""
    assert redfish.check_bmc(bmc.host("bmc-h4")) is None
    assert "credentials" in redfish.check_bmc(bmc.host("bmc-h4", oobm_password="wrong"))
    assert "power Off" in redfish.check_bmc(bmc.host("bmc-h2"))
    assert "404" in redfish.check_bmc(bmc.host("no-such-system"))
    nobody = bmc.host("bmc-h4", oobm_address=f"http://127.0.0.1:{free_port()}")
    with RedfishClient(connect_timeout=1.0, read_timeout=2.0) as quick:
        assert "unreachable" in quick.check_bmc(nobody)
    assert redfish.check_bmc(bmc.host("bmc-h4", oobm_enabled=False)) == \
        "out-of-band management not configured"
