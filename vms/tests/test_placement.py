"""Placement (SPEC R13, R24): where a VM may be started — an Up, Enabled host of its
cluster with room for it, honouring ha.tag (R13), the one with the largest free share
after placement first, each placement of a batch seeing the ones before it (R24). Tested both
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
from vms.tests.racing import race_after_first_ranking

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


# --- R24: spread -------------------------------------------------------------------------

# Hosts of different sizes, so that R24 (largest free share after placement, the smaller of
# the cpu and memory shares) and R13's old "least loaded" order disagree. For x (1 cpu /
# 1024 MB) the free shares after placement are h1 7/16 cpu, h2 19/32 cpu, h3 3072/16384
# memory (its cpus are nearly free), h4 and h5 11/16 cpu.
SPREAD = {
    "hosts": {"h1": {}, "h2": {"cpus": 32}, "h3": {"memory_mb": 16384}, "h4": {}, "h5": {}},
    "vms": {
        "a": {"host": "h1", "cpus": 8, "memory_mb": 8192},
        "b": {"host": "h2", "cpus": 12, "memory_mb": 1024},
        "c": {"host": "h3", "cpus": 1, "memory_mb": 12288},
        "d": {"host": "h4", "cpus": 4, "memory_mb": 4096},
        "e": {"host": "h5", "cpus": 4, "memory_mb": 4096},
        "x": {"state": "Stopped", "host": "h1"},
    },
}


def test_r24_candidates_ordered_by_largest_free_share_after_placement_ties_by_name():
    """R24: among fitting hosts, the one whose free share after placement — the smaller
    of free cpus / cpus and free memory / memory — is largest comes first; equal shares
    by host name. (R13's least-loaded order would have put h3, with 1 allocated cpu but
    its memory nearly full, first.)"""
    world(SPREAD)
    assert names(placement.candidates(vm("x"), ha=False, ha_tag="", cluster="c1")) == [
        "h4", "h5", "h2", "h1", "h3"]
    assert pick("x") == "h4"


def test_r24_memory_share_counts_as_much_as_cpu_share():
    """R24: the smaller share decides — a host with free cpus but little free memory
    after placement loses to one with a fair share of both."""
    world({"hosts": {"h1": {"memory_mb": 8192}, "h2": {}},
           "vms": {"m": {"host": "h1", "cpus": 1, "memory_mb": 4096},
                   "c": {"host": "h2", "cpus": 6, "memory_mb": 1024},
                   "x": {"state": "Stopped", "host": "h1", "cpus": 1, "memory_mb": 2048}}})
    # h1: cpus 14/16, memory 2048/8192 = 25 %; h2: cpus 9/16 = 56 %, memory 97 %.
    assert pick("x") == "h2"


def test_r24_stopped_vms_do_not_count_as_load():
    """R13/R24: only VMs that occupy capacity (Starting, Running, Stopping, Migrating)
    count; a Stopped VM's old host is not loaded by it."""
    w = world(SPREAD)
    VMInstance.objects.filter(name="a").update(state=VmState.STOPPED)
    assert pick("x") == "h1"  # empty now: 15/16 free after placement
    VMInstance.objects.filter(name="a").update(state=VmState.STARTING)
    assert pick("x") == "h4"
    assert w.result.violations == []


def test_r24_a_migration_under_way_counts_on_its_target():
    """R24 batch: a VM migrating towards a host (its Migration item Migrating there)
    already occupies that host, so the next migration of an evacuation sees it."""
    w = world({"hosts": {"h1": {}, "h2": {}, "h3": {}},
               "vms": {"m": {"host": "h1", "cpus": 4},
                       "x": {"state": "Stopped", "host": "h1"}}})
    assert pick("x") == "h2"
    m = vm("m")
    VMInstance.objects.filter(pk=m.pk).update(state=VmState.MIGRATING)
    now = w.clock.now()
    HaWork.objects.create(instance=m, vm_type=m.type, type=WorkType.MIGRATION,
                          reason="HostMaintenance", step=Step.MIGRATING, host=m.host,
                          target_host=Host.objects.get(name="h2"), state=VmState.MIGRATING,
                          update_count=m.update_count, time_to_try=now, created=now,
                          updated=now)
    # m counts on h1 (still its host) and on h2 (its target): h3 is now the most free.
    assert pick("x") == "h3"
    rooms = {r.name: r for r in placement.rooms_for("c1")}
    assert (rooms["h1"].used_cpus, rooms["h1"].used_memory_mb) == (4, 1024)
    assert (rooms["h2"].used_cpus, rooms["h2"].used_memory_mb) == (4, 1024)
    assert (rooms["h3"].used_cpus, rooms["h3"].used_memory_mb) == (0, 0)


def test_r24_ha_restart_lands_on_the_most_free_host_and_records_why():
    """R24 end to end: the HA VM of a failed host is started on the host with the
    largest free share after placement, and its HA item says why."""
    spec = {"hosts": {"h0": {}, **SPREAD["hosts"]},
            "vms": {**{k: v for k, v in SPREAD["vms"].items() if k != "x"},
                    "vm1": {"host": "h0", "ha": True}}}
    w = world(spec)
    fail_host(w, "h0")
    v = vm("vm1")
    assert (v.state, v.host.name) == (VmState.RUNNING, "h4")
    assert starts(w) == [("start", "h4", "vm1")]
    assert restarts("vm1") == 1
    [item] = HaWork.objects.filter(instance__name="vm1", type=WorkType.HA)
    assert item.placement == ("h4: most free after placement, 69 % cpu / 92 % memory free "
                              "(5 hosts fit)")
    # Shown with the item: API and the dashboard's work table.
    from django.contrib.auth import get_user_model
    from django.test import Client

    c = Client()
    c.force_login(get_user_model().objects.create_user("viewer"))
    assert c.get(f"/api/v1/ha-work/{item.pk}").json()["placement"] == item.placement
    assert f"placed on {item.placement}" in c.get("/work").content.decode()


def test_r24_a_hosts_ten_restarts_spread_over_the_cluster():
    """R24 batch: a host failure's 10 HA restarts, placed one at a time by the workers,
    each see the ones before it: the four equal hosts get 3, 3, 2 and 2 — none piles
    them up — and the bigger host, with most room, gets its share first."""
    vms = {f"v{i:02d}": {"host": "h0", "ha": True, "cpus": 2, "memory_mb": 4096}
           for i in range(10)}
    w = world({"hosts": {"h0": {"cpus": 32}, "h1": {}, "h2": {}, "h3": {}, "h4": {}},
               "vms": vms})
    fail_host(w, "h0")
    w.advance_to(60)
    placed = {}
    for v in VMInstance.objects.filter(name__in=vms).select_related("host"):
        assert v.state == VmState.RUNNING, v.name
        placed[v.host.name] = placed.get(v.host.name, 0) + 1
    assert sorted(placed.values()) == [2, 2, 3, 3]
    assert set(placed) == {"h1", "h2", "h3", "h4"}
    reasons = list(HaWork.objects.filter(type=WorkType.HA).values_list("placement", flat=True))
    assert len(reasons) == 10 and all("most free after placement" in r for r in reasons)


def test_r24_a_reservation_committed_meanwhile_moves_the_restart_to_the_next_best(
        monkeypatch):
    """R24 with parallel workers: between ranking the hosts and locking the best one,
    another worker's reservation lands on that host (committed). The restart then sees
    it and takes the host that is now the most free, instead of piling on."""
    w = world({"hosts": {"h0": {}, "h1": {}, "h2": {}, "h3": {}},
               "vms": {"x": {"host": "h0", "ha": True},
                       "on2": {"host": "h2", "cpus": 2}, "on3": {"host": "h3", "cpus": 3},
                       "other": {"state": "Stopped", "host": "h1", "cpus": 8}}})
    raced = race_after_first_ranking(monkeypatch, vm="x", other="other", onto="h1")
    fail_host(w, "h0")
    assert raced == ["h1"]  # h1 was the best when first ranked
    v = vm("x")
    assert (v.state, v.host.name) == (VmState.RUNNING, "h2")  # now the most free
    [item] = HaWork.objects.filter(instance__name="x", type=WorkType.HA)
    assert item.placement.startswith("h2: most free after placement")


def _late_before_placement(monkeypatch, w, host: str) -> None:
    """Make ``host`` miss its last ping (Up, not behind yet) just before the restart's
    placement reads the cluster, as a fellow host of a failing rack does."""
    from hadash import config

    real = placement.ranked

    def ranked(v, **kw):
        stale = w.clock.now() - dt.timedelta(seconds=2 * config.get("ping.interval"))
        Host.objects.filter(name=host).update(last_ping=stale)
        return real(v, **kw)

    monkeypatch.setattr(placement, "ranked", ranked)


@pytest.mark.parametrize("x_cpus, on2_cpus, lands_on", [
    (1, 4, "h2"),   # h2 pings on time: taken, though the late h1 has more room
    (4, 14, "h1"),  # only the late h1 has room: the restart is not held back
])
def test_r24_a_host_late_with_its_pings_is_taken_last(monkeypatch, x_cpus, on2_cpus,
                                                       lands_on):
    """A host that missed its last ping may be failing too (a rack going down host by
    host): the restart goes to a host that pings on time, though the late one has
    more room — and to the late one when nothing else fits."""
    w = world({"hosts": {"h0": {}, "h1": {}, "h2": {}},
               "vms": {"x": {"host": "h0", "ha": True, "cpus": x_cpus},
                       "on2": {"host": "h2", "cpus": on2_cpus}}})
    _late_before_placement(monkeypatch, w, "h1")
    fail_host(w, "h0")
    w.advance_to(40)
    v = vm("x")
    assert (v.state, v.host.name) == (VmState.RUNNING, lands_on)


def test_r24_a_restart_finds_room_beyond_the_rankings_head_filled_meanwhile(monkeypatch):
    """R24 with parallel workers, issue 12: under the host's lock only the head of the
    ranking is read again. When other reservations fill every host of that head
    between the two reads, the restart still finds the hosts further down (the whole
    cluster is ranked again) instead of giving up."""
    from hadash.ha import placement_guard

    head = placement_guard.RECHECK
    hosts = {"h0": {}, **{f"h{i:02d}": {} for i in range(1, head + 5)}}
    # h01…h<head> are emptier than the rest: they are the head of the ranking.
    vms = {"x": {"host": "h0", "ha": True, "cpus": 2},
           **{f"busy{i:02d}": {"host": f"h{i:02d}", "cpus": 4}
              for i in range(head + 1, head + 5)},
           **{f"filler{i:02d}": {"state": "Stopped", "cpus": 15} for i in range(1, head + 1)}}
    w = world({"hosts": hosts, "vms": vms})
    real = placement.ranked
    first: list[list[str]] = []

    def ranked_then_fill(v, **kw):
        found = real(v, **kw)
        if v.name == "x" and not first:
            first.append([r.name for r in found])
            for i in range(1, head + 1):  # other workers' restarts, committed
                VMInstance.objects.filter(name=f"filler{i:02d}").update(
                    state=VmState.STARTING, host=Host.objects.get(name=f"h{i:02d}"))
        return found

    monkeypatch.setattr(placement, "ranked", ranked_then_fill)
    fail_host(w, "h0")
    w.advance_to(40)
    assert first and first[0][:head] == [f"h{i:02d}" for i in range(1, head + 1)]
    v = vm("x")
    assert v.state == VmState.RUNNING
    assert v.host.name in {f"h{i:02d}" for i in range(head + 1, head + 5)}


def test_r24_an_evacuation_spreads_over_the_cluster():
    """R24 batch (issue 11: an evacuation sent 8 of 11 VMs to one host): maintenance of a
    host with 11 running VMs migrates them over the three other hosts 4/4/3, and each
    Migration item says why its target was chosen."""
    vms = {f"v{i:02d}": {"host": "h0", "cpus": 1, "memory_mb": 2048} for i in range(11)}
    w = world({"hosts": {"h0": {}, "h1": {}, "h2": {}, "h3": {}}, "vms": vms})
    w.advance_to(2)
    w.apply("host h0 maintenance")
    w.advance_to(60)
    assert Host.objects.get(name="h0").resource_state == ResourceState.MAINTENANCE
    placed = {}
    for v in VMInstance.objects.filter(name__in=vms).select_related("host"):
        placed[v.host.name] = placed.get(v.host.name, 0) + 1
    assert sorted(placed.values()) == [3, 4, 4]
    reasons = list(HaWork.objects.filter(type=WorkType.MIGRATION).values_list(
        "placement", flat=True))
    assert len(reasons) == 11 and all("most free after placement" in r for r in reasons)


def test_r24_pool_best_is_rank_first_whatever_the_batch():
    """R24: the in-memory pool the failover plan uses (each placement seeing the ones
    before it) picks exactly what `rank` picks on the same rooms — the very placement
    code, fast or not — across random clusters, sizes, tags and exclusions."""
    import random

    rnd = random.Random(7)
    for trial in range(200):
        rooms = [placement.Room(i, f"h{i:02d}", rnd.choice([8, 16, 32]),
                                rnd.choice([16384, 65536]), 0, 0,
                                ("ha",) if rnd.random() < 0.3 else ())
                 for i in range(rnd.randint(1, 12))]
        for r in rooms:
            r.used_cpus = rnd.randint(0, r.cpus)
            r.used_memory_mb = rnd.randint(0, r.memory_mb)
        pool = placement.Pool([placement.Room(**{f: getattr(r, f) for f in (
            "id", "name", "cpus", "memory_mb", "used_cpus", "used_memory_mb", "tags")})
            for r in rooms]).fork()
        exclude = frozenset(rnd.sample([r.id for r in rooms], k=min(2, len(rooms) - 1)))
        ha, tag = rnd.random() < 0.5, rnd.choice(["", "ha"])
        for _ in range(8):
            c, m = rnd.choice([1, 2, 4]), rnd.choice([512, 2048, 8192])
            current = [pool.room(r.id) for r in rooms]
            ranked = placement.rank(current, c, m, ha=ha, ha_tag=tag, exclude=exclude)
            got = pool.place(c, m, ha=ha, ha_tag=tag, exclude=exclude)
            assert (got.name if got else None) == (ranked[0].name if ranked else None), trial


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
