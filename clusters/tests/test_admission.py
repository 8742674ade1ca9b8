"""Admission control (SPEC R23): `ha.failover.level` and `ha.admission` off / warn /
enforce. enforce refuses — 409 with the reason, nothing written — registering, starting
or making HA-enabled an HA VM that would push its cluster's failover capacity below the
level; HA restarts are never refused. warn: the `failover-level` alert is open while a
cluster is below its level and resolves when it is back. Driven through the API and the
real engine on a simulated fleet (fleet.testing.world)."""

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from clusters import admission
from clusters.models import FailoverPlan
from fleet.testing import world
from hadash import config
from hadash.api import views
from hadash.choices import AlertState
from hadash.models import Alert, ApiToken, Event
from vms.choices import VmState
from vms.models import VMInstance

pytestmark = pytest.mark.django_db

# Two 4-cpu hosts, one 2-cpu HA VM on each: any one host may fail (capacity 1); a
# third 2-cpu HA VM on either host would not fit if that host failed (capacity 0).
TWO = {
    "config": {"ping.interval": 10},
    "hosts": {"h1": {"cpus": 4}, "h2": {"cpus": 4}},
    "vms": {"a": {"host": "h1", "ha": True, "cpus": 2},
            "b": {"host": "h2", "ha": True, "cpus": 2},
            "c": {"host": "h1", "ha": True, "cpus": 2, "state": "Stopped"},
            "plain": {"host": "h2", "cpus": 1, "state": "Stopped"}},
}


def set_cfg(w, **values):
    for k, v in values.items():
        config.set_value(k.replace("_", "."), v, now=w.clock.now(), by="test")


@pytest.fixture
def admin_api():
    user = get_user_model().objects.create_user("ops", is_staff=True)
    _, key = ApiToken.issue(user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


def register(api, name, *, ha=True, cpus=2, host="h1"):
    return api.post("/api/v1/vms", {"name": name, "host": host, "cpus": cpus,
                                    "memory_mb": 1024, "ha_enabled": ha}, format="json")


def alert_state(cluster="c1"):
    a = Alert.objects.filter(kind=admission.ALERT_KIND, subject_name=cluster).order_by(
        "-id").first()
    return a.state if a else None


def test_r23_enforce_refuses_registering_an_ha_vm_that_breaks_the_level(admin_api):
    w = world(TWO)
    set_cfg(w, ha_admission="enforce")
    events = Event.objects.count()
    r = register(admin_api, "d")
    assert r.status_code == 409
    assert r.json()["error"] == (
        "refused by admission control (ha.admission enforce): cluster c1 would survive 0 "
        "host failures with d (level 1): if h1 failed, 1 of its 2 HA VMs would not fit")
    assert not VMInstance.objects.filter(name="d").exists()
    assert Event.objects.count() == events  # nothing written
    # The same VM without HA changes no HA VM's fate: admitted.
    assert register(admin_api, "d", ha=False).status_code == 201


def test_r23_warn_admits_and_raises_the_alert_until_capacity_is_back(admin_api):
    w = world(TWO)
    w.advance_to(3)
    assert FailoverPlan.objects.get(cluster="c1").capacity == 1 and alert_state() is None
    r = register(admin_api, "d")  # ha.admission warn is the default
    assert r.status_code == 201
    w.advance_to(10)
    assert FailoverPlan.objects.get(cluster="c1").capacity == 0
    assert alert_state() == AlertState.OPEN
    alert = Alert.objects.get(kind=admission.ALERT_KIND)
    assert "Cluster c1 below its failover level: survives 0 host failures, level 1" == \
        alert.title
    # Back to capacity 1 (the operator lowers the level): resolved by itself.
    set_cfg(w, ha_failover_level=0)
    w.advance_to(20)
    assert alert_state() == AlertState.RESOLVED


def test_r23_off_raises_nothing_and_refuses_nothing(admin_api):
    w = world(TWO)
    set_cfg(w, ha_admission="off")
    assert register(admin_api, "d").status_code == 201
    w.advance_to(10)
    assert FailoverPlan.objects.get(cluster="c1").capacity == 0
    assert alert_state() is None


def test_r23_enforce_refuses_an_operator_start_and_changes_nothing(admin_api, monkeypatch):
    w = world(TWO)
    monkeypatch.setattr(views, "production_engine", lambda: w.engine)
    set_cfg(w, ha_admission="enforce")
    r = admin_api.post("/api/v1/vms/c/start")
    assert r.status_code == 409
    assert "cluster c1 would survive 0 host failures with c (level 1)" in r.json()["error"]
    assert VMInstance.objects.get(name="c").state == VmState.STOPPED
    assert not [x for x in w.fleet.calls if x[0] == "start"]
    # A VM without HA starts: admission is about HA VMs (R23).
    assert admin_api.post("/api/v1/vms/plain/start").status_code == 200
    # With the level at 0 the HA VM starts too.
    set_cfg(w, ha_failover_level=0)
    assert admin_api.post("/api/v1/vms/c/start").status_code == 200
    assert VMInstance.objects.get(name="c").state == VmState.RUNNING


def test_r23_enforce_refuses_making_a_vm_ha_enabled(admin_api):
    w = world({"hosts": {"h1": {"cpus": 4}, "h2": {"cpus": 6}},
               "vms": {"a": {"host": "h1", "ha": True, "cpus": 2},
                       "e": {"host": "h2", "cpus": 3}}})
    set_cfg(w, ha_admission="enforce")
    r = admin_api.patch("/api/v1/vms/e", {"ha_enabled": True}, format="json")
    assert r.status_code == 409
    assert "if h2 failed, 1 of its 1 HA VM would not fit" in r.json()["error"]
    assert VMInstance.objects.get(name="e").ha_enabled is False
    # Other settings go through; turning HA off is never refused.
    assert admin_api.patch("/api/v1/vms/e", {"priority": "high"},
                           format="json").status_code == 200
    assert admin_api.patch("/api/v1/vms/a", {"ha_enabled": False},
                           format="json").status_code == 200


def test_r23_ha_restarts_are_never_refused():
    """enforce, and the cluster left below its level by the failure: the HA VM of the
    failed host is restarted all the same."""
    w = world(TWO)
    set_cfg(w, ha_admission="enforce")
    w.advance_to(5)
    w.apply("host h1 power off")
    w.advance_to(60)
    a = VMInstance.objects.select_related("host").get(name="a")
    assert a.state == VmState.RUNNING and a.host.name == "h2"
    assert FailoverPlan.objects.get(cluster="c1").capacity == 0


def test_r23_r19_a_host_failure_is_its_incident_not_a_failover_level_alert():
    """The capacity lost to a failed host is told by the incident's one alert (R19);
    the failover-level alert is not opened while a host of the cluster is down."""
    w = world(TWO)
    w.advance_to(5)
    w.apply("host h1 power off")
    w.advance_to(90)
    assert FailoverPlan.objects.get(cluster="c1").capacity == 0
    assert alert_state() is None
    assert Alert.objects.filter(incident__isnull=False).count() == 1


def test_r23_the_reason_is_computed_on_a_copy_with_the_vm():
    world({"hosts": {"h1": {"cpus": 8}, "h2": {"cpus": 8}},
           "vms": {"a": {"host": "h1", "ha": True, "cpus": 2},
                   "b": {"host": "h2", "ha": True, "cpus": 2}}})
    cfg = {"ha.tag": "", "vm.ha.enabled": True, "force.ha": False,
           "ha.failover.level": 1, "ha.admission": "enforce"}
    h1 = VMInstance.objects.get(name="a").host_id
    # 2 + 3 cpus on h1 still fit in h2's 6 free; 2 + 5 do not.
    assert admission.refusal(cluster="c1", name="small", host_id=h1, cpus=3,
                             memory_mb=512, ha_enabled=True, cfg=cfg) == ""
    assert admission.refusal(
        cluster="c1", name="big", host_id=h1, cpus=5, memory_mb=512, ha_enabled=True,
        cfg=cfg) == ("cluster c1 would survive 0 host failures with big (level 1): if h1 "
                     "failed, 1 of its 2 HA VMs would not fit")
    # With a non-HA VM, or vm.ha.enabled off, there is nothing to refuse.
    assert admission.refusal(cluster="c1", name="big", host_id=h1, cpus=5, memory_mb=512,
                             ha_enabled=False, cfg=cfg) == ""
    assert admission.refusal(cluster="c1", name="big", host_id=h1, cpus=5, memory_mb=512,
                             ha_enabled=True, cfg={**cfg, "vm.ha.enabled": False}) == ""
    # Nothing was written: the copy is the plan code's own.
    assert VMInstance.objects.count() == 2
