"""VM groups and restart order (SPEC R25, R17): anti-affinity (strict) and affinity
(soft) honoured by HA restarts, maintenance migrations, operator starts and the
failover plan (R22); a restart that cannot honour anti-affinity waits with its reason;
strict restart order with its timeout; groups in the API and on the dashboard. Driven
through the real engine on a simulated fleet with virtual time (fleet.testing.world)."""

import pytest
from django.contrib.auth import get_user_model

from fleet.testing import world
from hadash.choices import WaitCause, WorkType
from hadash.models import Event, HaWork
from hosts.choices import HostStatus
from hosts.models import Host
from vms import failover, groups, placement
from vms.choices import VmState
from vms.models import VmGroup, VMInstance
from vms.tests.racing import race_after_first_ranking

pytestmark = pytest.mark.django_db

CFG = {"ha.tag": "", "vm.ha.enabled": True, "force.ha": False}


def vm(name):
    return VMInstance.objects.select_related("host", "last_host").get(name=name)


def group(name, kind, *members):
    g = VmGroup.objects.create(name=name, kind=kind)
    g.members.set(VMInstance.objects.filter(name__in=members))
    return g


def fail(w, host, until=60):
    w.advance_to(5)
    w.apply(f"host {host} power off")
    w.advance_to(until)
    assert Host.objects.get(name=host).status == HostStatus.DOWN


def plan(cluster="c1", **cfg):
    return failover.compute(failover.load([cluster], cfg={**CFG, **cfg})[cluster])


# db1 on h1, db2 on h2 (the emptiest after h1), h3 busier: spread alone picks h2.
THREE = {
    "config": {"ping.interval": 10},
    "hosts": {"h1": {}, "h2": {}, "h3": {}},
    "vms": {
        "db1": {"host": "h1", "ha": True, "cpus": 2},
        "db2": {"host": "h2", "ha": True, "cpus": 2},
        "filler": {"host": "h3", "cpus": 8},
    },
}


# --- placement (pure and from the database) ----------------------------------------------

def test_r25_rank_leaves_out_avoided_hosts_and_puts_preferred_first():
    rooms = [placement.Room(1, "a", 16, 65536), placement.Room(2, "b", 16, 65536, 8, 0),
             placement.Room(3, "c", 16, 65536, 4, 0)]
    plain = placement.rank(rooms, 1, 1024, ha=True, ha_tag="")
    assert [r.name for r in plain] == ["a", "c", "b"]
    anti = placement.build_rule([("db", "anti-affinity", "db2", 1)])
    assert [r.name for r in placement.rank(rooms, 1, 1024, ha=True, ha_tag="",
                                           rule=anti)] == ["c", "b"]
    aff = placement.build_rule([("shop", "affinity", "web", 2)])
    assert [r.name for r in placement.rank(rooms, 1, 1024, ha=True, ha_tag="",
                                           rule=aff)] == ["b", "a", "c"]
    # The pool's choice is the ranking's first.
    pool = placement.Pool(rooms)
    assert pool.best(1, 1024, ha=True, ha_tag="", exclude=frozenset(anti.avoid)).name == "c"
    assert pool.best(1, 1024, ha=True, ha_tag="", prefer=aff.prefer).name == "b"


def test_r25_affinity_is_soft_a_full_member_host_is_passed_over():
    rooms = [placement.Room(1, "a", 4, 65536, 4, 0), placement.Room(2, "b", 16, 65536)]
    aff = placement.build_rule([("shop", "affinity", "web", 1)])
    assert [r.name for r in placement.rank(rooms, 1, 1024, ha=True, ha_tag="",
                                           rule=aff)] == ["b"]
    assert placement.Pool(rooms).best(1, 1024, ha=True, ha_tag="",
                                      prefer=aff.prefer).name == "b"


# --- HA restarts ------------------------------------------------------------------------

def test_r25_ha_restart_never_lands_beside_an_anti_affinity_member():
    w = world(THREE)
    group("db", "anti-affinity", "db1", "db2")
    fail(w, "h1", until=90)
    assert vm("db1").state == VmState.RUNNING and vm("db1").host.name == "h3"
    item = HaWork.objects.get(instance__name="db1", type=WorkType.HA)
    assert item.placement.startswith("h3:")


def test_r25_without_the_group_the_same_restart_goes_to_the_emptier_host():
    """The control for the test above: the rule, not the load, sent db1 to h3."""
    w = world(THREE)
    fail(w, "h1", until=90)
    assert vm("db1").host.name == "h2"


def test_r25_r17_restart_that_cannot_honour_anti_affinity_waits_with_its_reason():
    w = world({"config": {"ping.interval": 10, "restart.retry.interval": 30},
               "hosts": {"h1": {}, "h2": {}},
               "vms": {"db1": {"host": "h1", "ha": True}, "db2": {"host": "h2", "ha": True}}})
    group("db", "anti-affinity", "db1", "db2")
    fail(w, "h1", until=90)
    item = HaWork.objects.get(instance__name="db1", type=WorkType.HA)
    assert item.waiting == WaitCause.ANTI_AFFINITY
    assert "group db: every fitting host already runs a member (h2)" in item.last_error
    assert vm("db1").state == VmState.STOPPED
    from vms import hastatus

    status = hastatus.status_of(vm("db1"), now=w.clock.now())
    assert (status.code, status.cause) == ("waiting", WaitCause.ANTI_AFFINITY)
    assert "group db" in status.reason
    # The operator stops the other member: the next try restarts db1 on h2.
    w.apply("vm db2 stop")
    w.advance_to(150)
    assert vm("db1").state == VmState.RUNNING and vm("db1").host.name == "h2"


def test_r25_two_members_of_one_failed_host_restart_on_different_hosts():
    w = world({"config": {"ping.interval": 10},
               "hosts": {"h1": {}, "h2": {}, "h3": {}},
               "vms": {"a1": {"host": "h1", "ha": True}, "a2": {"host": "h1", "ha": True}}})
    group("web", "anti-affinity", "a1", "a2")
    fail(w, "h1", until=90)
    assert {vm("a1").host.name, vm("a2").host.name} == {"h2", "h3"}


def test_r25_a_member_reserved_meanwhile_on_the_best_host_moves_the_restart(monkeypatch):
    """R25 with parallel workers: between ranking the hosts and locking the best one,
    another worker reserves that host for another member of the anti-affinity group
    (committed). The restart then sees the member there and goes elsewhere."""
    w = world({"config": {"ping.interval": 10},
               "hosts": {"h0": {}, "h1": {}, "h2": {}},
               "vms": {"x": {"host": "h0", "ha": True}, "on2": {"host": "h2", "cpus": 2},
                       "y": {"state": "Stopped", "host": "h1"}}})
    group("db", "anti-affinity", "x", "y")
    raced = race_after_first_ranking(monkeypatch, vm="x", other="y", onto="h1")
    fail(w, "h0", until=60)
    assert raced == ["h1"]  # h1 was the best when first ranked
    assert (vm("x").state, vm("x").host.name) == (VmState.RUNNING, "h2")


def test_r25_affinity_restart_prefers_a_members_host():
    w = world({"config": {"ping.interval": 10},
               "hosts": {"h1": {}, "h2": {}, "h3": {}},
               "vms": {"app": {"host": "h1", "ha": True}, "web": {"host": "h2", "ha": True},
                       "busy": {"host": "h2", "cpus": 6}}})
    group("shop", "affinity", "app", "web")
    fail(w, "h1", until=90)
    assert vm("app").host.name == "h2"


# --- maintenance, operator start ------------------------------------------------------------

def test_r25_maintenance_migration_and_its_preview_honour_anti_affinity():
    w = world(THREE)
    group("db", "anti-affinity", "db1", "db2")
    preview = failover.preview_evacuation(Host.objects.get(name="h1"))
    assert [(p["vm"], p["target"]) for p in preview] == [("db1", "h3")]
    w.advance_to(5)
    w.apply("host h1 maintenance")
    w.advance_to(40)
    assert vm("db1").host.name == "h3"


def test_r25_operator_start_honours_anti_affinity_and_says_why_not():
    w = world({"hosts": {"h1": {}, "h2": {}},
               "vms": {"db1": {"host": "h1"}, "db2": {"host": "h2"},
                       "db3": {"host": "h1", "state": "Stopped"}}})
    group("db", "anti-affinity", "db1", "db2", "db3")
    from fleet.scenario import Refused

    with pytest.raises(Refused, match="group db: every fitting host already runs a member"):
        w.apply("vm db3 start")
    assert vm("db3").state == VmState.STOPPED


# --- the failover plan --------------------------------------------------------------------

def test_r22_r25_the_plan_honours_anti_affinity():
    world({"hosts": {"h1": {}, "h2": {}, "h3": {}},
           "vms": {"db1": {"host": "h1", "ha": True}, "db2": {"host": "h2", "ha": True}}})
    assert plan().capacity == 2
    group("db", "anti-affinity", "db1", "db2")
    p = plan()
    assert p.per_host["h1"] == {"db1": "h3"} and p.per_host["h2"] == {"db2": "h3"}
    assert p.capacity == 1  # h1 and h3 failing: db1 may only go to h2, where db2 runs


def test_r22_r25_group_changes_change_the_fingerprint():
    world(THREE)
    before = failover.fingerprints(cfg=CFG)
    g = group("db", "anti-affinity", "db1")
    after = failover.fingerprints(cfg=CFG)
    assert after != before
    g.members.add(vm("db2"))
    assert failover.fingerprints(cfg=CFG) != after


# --- restart order ----------------------------------------------------------------------------

ORDER = {
    "config": {"ping.interval": 10, "restart.retry.interval": 20},
    "hosts": {"h1": {}, "h2": {}},
    "vms": {"hi": {"host": "h1", "ha": True, "priority": "high"},
            "lo": {"host": "h1", "ha": True, "priority": "low"}},
}


def started_at(name):
    return Event.objects.filter(vm__name=name, event="HaStarted").values_list(
        "time", flat=True).first()


def test_r25_strict_order_a_lower_priority_waits_for_the_higher_ones():
    w = world({**ORDER, "config": {**ORDER["config"], "ha.restart.order": "strict"}})
    w.apply("host h2 start-fail 1")
    fail(w, "h1", until=40)  # Down at 26; hi's start failed, next try at 46
    lo = HaWork.objects.get(instance__name="lo", type=WorkType.HA)
    assert lo.waiting == WaitCause.ORDER
    assert "waits for 1 high-priority VM of incident #" in lo.last_error
    assert vm("lo").state == VmState.STOPPED
    w.advance_to(90)
    assert vm("hi").state == vm("lo").state == VmState.RUNNING
    assert started_at("hi") <= started_at("lo")


def test_r25_priority_order_does_not_hold_anyone_back():
    """The control: with the default order, lo starts while hi backs off."""
    w = world(ORDER)
    w.apply("host h2 start-fail 1")
    fail(w, "h1", until=40)
    assert vm("lo").state == VmState.RUNNING and vm("hi").state == VmState.STOPPED


def test_r25_strict_order_gives_up_waiting_after_the_timeout():
    w = world({"config": {"ping.interval": 10, "restart.retry.interval": 30,
                          "ha.restart.order": "strict", "ha.restart.order.timeout": 40},
               "hosts": {"h1": {"cpus": 16}, "h2": {"cpus": 8}},
               "vms": {"big": {"host": "h1", "ha": True, "priority": "high", "cpus": 12},
                       "lo": {"host": "h1", "ha": True, "priority": "low", "cpus": 2}}})
    fail(w, "h1", until=60)
    assert HaWork.objects.get(instance__name="lo").waiting == WaitCause.ORDER
    declared = HaWork.objects.get(instance__name="lo").incident.declared_at
    w.advance_to(120)
    assert vm("lo").state == VmState.RUNNING
    assert (started_at("lo") - declared).total_seconds() >= 40
    assert vm("big").state == VmState.STOPPED


# --- domain, API, dashboard ------------------------------------------------------------------

def test_r25_group_changes_are_validated_and_recorded():
    world(THREE)
    g = groups.create(name="db", kind="anti-affinity", vms=["db1", "db2"],
                      now=VMInstance.objects.first().created, by="ops")
    assert Event.objects.filter(event="GroupCreated", subject_name="vm-group db").exists()
    with pytest.raises(groups.GroupError, match="already exists"):
        groups.create(name="db", kind="affinity", vms=[], now=g.created)
    with pytest.raises(groups.GroupError, match="no VM named 'nope'"):
        groups.update(g, vms=["db1", "nope"], now=g.created)
    assert sorted(g.members.values_list("name", flat=True)) == ["db1", "db2"]
    with pytest.raises(groups.GroupError, match="kind must be one of"):
        groups.create(name="x", kind="sticky", vms=[], now=g.created)


def test_r25_api_vm_groups_crud(ro_api, api):
    world({"hosts": {"h1": {}, "h2": {}},
           "vms": {"db1": {"host": "h1"}, "db2": {"host": "h1"}, "db3": {"host": "h2"}}})
    r = api.post("/api/v1/vm-groups", {"name": "db", "kind": "anti-affinity",
                                             "vms": ["db1", "db2"]}, format="json")
    assert r.status_code == 201, r.content
    body = r.json()
    assert body["vms"] == ["db1", "db2"] and body["kind"] == "anti-affinity"
    assert body["conflicts"] == ["h1: db1, db2"]  # from before the group: named, not moved
    assert ro_api.get("/api/v1/vm-groups").json()[0]["name"] == "db"
    assert ro_api.post("/api/v1/vm-groups", {"name": "x", "kind": "affinity"},
                    format="json").status_code == 403
    r = api.patch("/api/v1/vm-groups/db", {"vms": ["db1", "db3"]}, format="json")
    assert r.status_code == 200 and r.json()["vms"] == ["db1", "db3"]
    assert r.json()["conflicts"] == []
    assert ro_api.get("/api/v1/vms/db1").json()["groups"] == ["db"]
    r = api.delete("/api/v1/vm-groups/db")
    assert r.status_code == 204 and not VmGroup.objects.exists()
    assert api.get("/api/v1/vm-groups/db").status_code == 404


@pytest.mark.parametrize("body,words", [
    ({"name": "g", "kind": "sticky", "vms": []}, "kind"),
    ({"name": "g", "kind": "affinity", "vms": ["nope"]}, "no VM named 'nope'"),
    ({"name": "g", "kind": "affinity", "vms": "db1"}, "vms"),
    ({"kind": "affinity"}, "name required"),
    ({"name": "bad name", "kind": "affinity"}, "name"),
    ({"name": "g", "kind": "affinity", "colour": "red"}, "unknown field"),
])
def test_r25_api_refuses_bad_groups_clearly_and_changes_nothing(api, body, words):
    world({"hosts": {"h1": {}}, "vms": {"db1": {"host": "h1"}}})
    r = api.post("/api/v1/vm-groups", body, format="json")
    assert r.status_code == 400
    assert words in str(r.json())
    assert not VmGroup.objects.exists()


def test_r25_cluster_and_vm_pages_show_groups(client):
    world(THREE)
    group("db", "anti-affinity", "db1", "db2")
    client.force_login(get_user_model().objects.create_user("viewer"))
    page = client.get("/clusters/c1").content.decode()
    assert 'id="vm-groups"' in page and "db1" in page and "anti-affinity" in page
    assert 'id="plan-admission">warn' in page  # R23: the admission mode beside the level
    page = client.get("/vms/db1").content.decode()
    assert 'id="vm-groups-line"' in page and "db" in page
