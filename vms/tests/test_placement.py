"""Placement (SPEC R13): where a VM may be started — an Up, Enabled host of its
cluster with room for it, honouring ha.tag, the least loaded first. Tested both
directly (vms.placement) and end to end through HA restarts on a simulated fleet with
virtual time (fleet.testing.world)."""

import datetime as dt

import pytest

from fleet.testing import world
from hadash.choices import Step, WorkType
from hadash.models import Event, HaWork
from hosts.choices import HostStatus, ResourceState
from hosts.models import Host
from vms import placement
from vms.choices import VmState
from vms.models import VMInstance

pytestmark = pytest.mark.django_db


# --- helpers -------------------------------------------------------------------------

def vm(name):
    return VMInstance.objects.select_related("host", "last_host").get(name=name)


def at(w, t):
    return w.clock.epoch + dt.timedelta(seconds=t)


def names(hosts):
    return [h.name for h in hosts]


def pick(name, *, ha=False, ha_tag="", cluster="c1"):
    h = placement.pick_host(vm(name), ha=ha, ha_tag=ha_tag, cluster=cluster)
    return h.name if h else None


def starts(w):
    return [c for c in w.fleet.calls if c[0] == "start"]


def restarts(name):
    return Event.objects.filter(vm__name=name, event="HaStarted").count()


def fail_host(w, name, at_t=5):
    """Power ``name`` off at ``at_t``; it is found Down at the sweep of t=26."""
    w.advance_to(at_t)
    w.apply(f"host {name} power off")
    w.advance_to(26)
    assert Host.objects.get(name=name).status == HostStatus.DOWN


LOADED = {
    "hosts": {"h1": {}, "h2": {}, "h3": {}, "h4": {}},
    "vms": {
        "a": {"host": "h1", "cpus": 2, "memory_mb": 1024},
        "b": {"host": "h2", "cpus": 1, "memory_mb": 4096},
        "c": {"host": "h3", "cpus": 1, "memory_mb": 2048},
        "d": {"host": "h4", "cpus": 1, "memory_mb": 2048},
        "x": {"state": "Stopped", "host": "h1"},
    },
}


# --- least loaded ------------------------------------------------------------------------

def test_r13_candidates_ordered_by_allocated_cpus_then_memory_then_name():
    """R13: among fitting hosts the least loaded first: fewest allocated cpus, then
    least allocated memory, then host name."""
    world(LOADED)
    found = placement.candidates(vm("x"), ha=False, ha_tag="", cluster="c1")
    assert names(found) == ["h3", "h4", "h2", "h1"]
    assert pick("x") == "h3"


def test_r13_stopped_vms_do_not_count_as_load():
    """R13: only VMs that occupy capacity (Starting, Running, Stopping, Migrating)
    count; a Stopped VM's old host is not loaded by it."""
    w = world(LOADED)
    VMInstance.objects.filter(name="a").update(state=VmState.STOPPED)
    assert names(placement.candidates(vm("x"), ha=False, ha_tag="", cluster="c1")) == [
        "h1", "h3", "h4", "h2"]
    VMInstance.objects.filter(name="a").update(state=VmState.STARTING)
    assert pick("x") == "h3"
    assert w.result.violations == []


def test_r13_ha_restart_lands_on_the_least_loaded_host():
    """R13 end to end: the HA VM of a failed host is started on the least loaded host
    of its cluster, and only there."""
    spec = {"hosts": {"h0": {}, **LOADED["hosts"]},
            "vms": {**{k: v for k, v in LOADED["vms"].items() if k != "x"},
                    "vm1": {"host": "h0", "ha": True}}}
    w = world(spec)
    fail_host(w, "h0")
    v = vm("vm1")
    assert (v.state, v.host.name) == (VmState.RUNNING, "h3")
    assert starts(w) == [("start", "h3", "vm1")]
    assert restarts("vm1") == 1


# --- capacity ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "h2,others,size",
    [
        ({"cpus": 4}, {}, {"cpus": 8}),
        ({"memory_mb": 2048}, {}, {"memory_mb": 4096}),
        ({"cpus": 4}, {"small": {"host": "h2", "cpus": 2}}, {"cpus": 3}),
    ],
    ids=["cpus", "memory", "free-not-total"],
)
def test_r13_vm_that_fits_nowhere_stays_stopped_and_waits_without_counting_tries(
    h2, others, size
):
    """R13: capacity is respected (free cpus and memory, after what is already
    allocated). A VM that fits nowhere stays Stopped and its HA item stays Scheduled
    with tried 0, retried every restart.retry.interval without back-off; when capacity
    comes back (a new host connects) it is started there."""
    w = world({"config": {"restart.retry.interval": 30},
               "hosts": {"h1": {}, "h2": h2},
               "vms": {"big": {"host": "h1", "ha": True, **size}, **others}})
    fail_host(w, "h1")
    v = vm("big")
    assert (v.state, v.host, v.last_host.name) == (VmState.STOPPED, None, "h1")
    [item] = HaWork.objects.filter(instance__name="big", type=WorkType.HA)
    assert (item.step, item.tried, item.time_to_try) == (Step.SCHEDULED, 0, at(w, 56))
    assert starts(w) == []
    w.advance_to(56)
    item.refresh_from_db()
    assert (item.step, item.tried, item.time_to_try) == (Step.SCHEDULED, 0, at(w, 86))
    assert vm("big").state == VmState.STOPPED
    assert starts(w) == []
    # Capacity comes back.
    w.advance_to(60)
    w.fleet.add_host("h3")
    w.connect("h3")
    w.advance_to(85)
    assert vm("big").state == VmState.STOPPED
    w.advance_to(86)
    v = vm("big")
    assert (v.state, v.host.name) == (VmState.RUNNING, "h3")
    item.refresh_from_db()
    assert (item.step, item.tried) == (Step.DONE, 0)
    assert starts(w) == [("start", "h3", "big")]


def test_r13_a_vm_that_exactly_fills_the_free_room_fits():
    """R13: "free cpus and memory for the VM" — a host whose free room equals the VM's
    size fits; one unit less does not."""
    w = world({"hosts": {"h1": {"cpus": 4, "memory_mb": 4096}},
               "vms": {"used": {"host": "h1", "cpus": 2, "memory_mb": 2048},
                       "x": {"state": "Stopped", "host": "h1", "cpus": 2,
                             "memory_mb": 2048}}})
    assert pick("x") == "h1"
    VMInstance.objects.filter(name="x").update(cpus=3)
    assert pick("x") is None
    VMInstance.objects.filter(name="x").update(cpus=2, memory_mb=2049)
    assert pick("x") is None
    assert w.result.violations == []


# --- which hosts qualify -------------------------------------------------------------------

def test_r13_ha_restart_lands_only_on_an_up_enabled_host_of_the_vms_cluster():
    """R13 end to end: the HA VM is started on the loaded but Up and Enabled host of its
    own cluster, not on an empty Disabled host, an empty host in Maintenance, or an
    empty host of another cluster."""
    w = world({"hosts": {"h1": {}, "h2": {}, "h3": {"cluster": "c2"}, "h4": {}, "h5": {}},
               "vms": {"vm1": {"host": "h1", "ha": True},
                       "load": {"host": "h4", "cpus": 8}}})
    w.advance_to(2)
    w.apply("host h2 disable")
    w.apply("host h5 maintenance")
    assert Host.objects.get(name="h5").resource_state == ResourceState.MAINTENANCE
    fail_host(w, "h1")
    v = vm("vm1")
    assert (v.state, v.host.name) == (VmState.RUNNING, "h4")
    assert starts(w) == [("start", "h4", "vm1")]


@pytest.mark.parametrize(
    "field,value",
    [
        ("status", HostStatus.DOWN),
        ("status", HostStatus.ALERT),
        ("status", HostStatus.DISCONNECTED),
        ("status", HostStatus.CONNECTING),
        ("resource_state", ResourceState.DISABLED),
        ("resource_state", ResourceState.PREPARE_FOR_MAINTENANCE),
        ("resource_state", ResourceState.MAINTENANCE),
        ("resource_state", ResourceState.ERROR_IN_MAINTENANCE),
    ],
)
def test_r13_pick_host_takes_only_up_and_enabled_hosts(field, value):
    """R13: a host that is not Up, or not Enabled, is never chosen — however empty."""
    world({"hosts": {"h1": {}, "h2": {}},
           "vms": {"load": {"host": "h1", "cpus": 8},
                   "x": {"state": "Stopped", "host": "h1"}}})
    assert pick("x") == "h2"
    Host.objects.filter(name="h2").update(**{field: value})
    assert pick("x") == "h1"
    assert pick("x", ha=True) == "h1"
    Host.objects.filter(name="h1").update(**{field: value})
    assert pick("x") is None


def test_r13_pick_host_stays_in_the_cluster():
    """R13: only hosts of the VM's cluster are candidates."""
    world({"hosts": {"h1": {}, "h2": {"cluster": "c2"}, "h3": {"cluster": "c2"}},
           "vms": {"load": {"host": "h1", "cpus": 15},
                   "x": {"state": "Stopped", "host": "h1", "cpus": 2}}})
    assert pick("x", cluster="c1") is None
    assert pick("x", cluster="c2") == "h2"
    assert vm("x").cluster == "c1"


# --- ha.tag --------------------------------------------------------------------------------

HA_TAGGED = {
    "config": {"ha.tag": "ha"},
    "hosts": {"h1": {}, "h2": {}, "h3": {"tags": ["ssd", "ha"]}, "h4": {"tags": ["hax"]}},
    "vms": {"vm1": {"host": "h1", "ha": True},
            "load3": {"host": "h3", "cpus": 8},
            "load4": {"host": "h4", "cpus": 4},
            "x": {"state": "Stopped", "host": "h1"}},
}


def test_r13_ha_tag_ha_restart_lands_only_on_a_tagged_host():
    """R13/ha.tag: HA restarts may only land on hosts with the tag — the loaded tagged
    host h3 wins over the empty untagged h2 (and over h4, tagged "hax", which is not
    the tag)."""
    w = world(HA_TAGGED)
    fail_host(w, "h1")
    v = vm("vm1")
    assert (v.state, v.host.name) == (VmState.RUNNING, "h3")
    assert starts(w) == [("start", "h3", "vm1")]


def test_r13_ha_tag_ordinary_placement_avoids_tagged_hosts():
    """R13/ha.tag: pick_host(ha=False) avoids hosts with the tag, even when they are
    the least loaded; a host whose tag merely contains the text is not avoided. With
    ha=True only tagged hosts qualify. Without ha.tag, tags do not matter."""
    world(HA_TAGGED)
    VMInstance.objects.filter(name="load3").update(state=VmState.STOPPED)  # h3 now empty
    VMInstance.objects.filter(name="vm1").update(cpus=2)  # h1 more loaded than h2
    assert names(placement.candidates(vm("x"), ha=False, ha_tag="ha", cluster="c1")) == [
        "h2", "h1", "h4"]
    assert pick("x", ha=False, ha_tag="ha") == "h2"
    assert pick("x", ha=True, ha_tag="ha") == "h3"
    for ha in (False, True):  # no ha.tag: h3 is an ordinary host (tie with h2 by name)
        assert names(placement.candidates(vm("x"), ha=ha, ha_tag="", cluster="c1")) == [
            "h2", "h3", "h1", "h4"]
    # When only the tagged host has room, ordinary placement finds nothing.
    Host.objects.exclude(name="h3").update(status=HostStatus.DISCONNECTED)
    assert pick("x", ha=False, ha_tag="ha") is None


def test_r13_ha_tag_ha_restart_waits_when_no_tagged_host_has_room():
    """R13/ha.tag: when no tagged host has room, the HA VM is not started on an
    untagged host: it stays Stopped and its item waits (Scheduled, tried 0)."""
    spec = {**HA_TAGGED, "hosts": {**HA_TAGGED["hosts"],
                                   "h3": {"tags": ["ssd", "ha"], "cpus": 8}}}
    w = world(spec)
    fail_host(w, "h1")
    v = vm("vm1")
    assert (v.state, v.host) == (VmState.STOPPED, None)
    [item] = HaWork.objects.filter(instance__name="vm1", type=WorkType.HA)
    assert (item.step, item.tried) == (Step.SCHEDULED, 0)
    assert starts(w) == []


def test_r13_ha_tag_every_fitting_host_is_either_ha_or_ordinary():
    """R13/ha.tag: with ha.tag set, every fitting Up/Enabled host is a candidate for
    exactly one kind of placement — HA restarts (it has the tag) or ordinary placement
    (it has not) — whatever the case of its tags and on every database."""
    world({"hosts": {"h1": {"tags": ["ha"]}, "h2": {"tags": ["ssd", "Ha"]},
                     "h3": {"tags": ["HA"]}, "h4": {"tags": ["ha", "ssd"]}, "h5": {}},
           "vms": {"x": {"state": "Stopped", "host": "h1"}}})
    x = vm("x")
    ha = set(names(placement.candidates(x, ha=True, ha_tag="ha", cluster="c1")))
    ordinary = set(names(placement.candidates(x, ha=False, ha_tag="ha", cluster="c1")))
    assert ha & ordinary == set()
    assert ha | ordinary == {"h1", "h2", "h3", "h4", "h5"}
    assert {"h1", "h4"} <= ha and "h5" in ordinary
