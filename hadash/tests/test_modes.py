"""HA modes (SPEC R26): armed, observe and disarmed, for the installation and per
cluster — driven through the real engine on a simulated fleet with virtual time
(fleet.testing.world): what an operator sees happen, or not happen."""

import pytest
from django.contrib.auth.models import User
from django.test import Client

from fleet.testing import world
from hadash import config
from hadash.choices import Reason, Step, WaitCause
from hadash.config import ConfigError
from hadash.ha import modes
from hadash.models import Alert, Event, HaWork, Incident, IncidentVm
from vms import hastatus
from vms.models import VMInstance

pytestmark = pytest.mark.django_db

TWO_HOSTS = {
    "hosts": {"h1": {}, "h2": {}},
    "vms": {"vm1": {"host": "h1", "ha": True}},
}


def vm(name):
    return VMInstance.objects.select_related("host").get(name=name)


def sent(w, *kinds):
    """What the server sent to the simulated machines, of these kinds."""
    return [c for c in w.fleet.calls if c[0] in kinds]


def mode_alerts(state="open"):
    return list(Alert.objects.filter(kind=modes.ALERT_KIND, state=state)
                .values_list("subject", "subject_name"))


def test_r26_observe_records_what_would_be_done_and_sends_nothing():
    """R26 observe: a host power loss is detected, declared and recorded, but nothing
    is fenced, stopped or started; the HA item says what it would have done (the real
    placement) and ends Done with reason Observed; the incident records it."""
    w = world({**TWO_HOSTS, "config": {"ha.mode": "observe"}})
    w.advance_to(15)
    w.fleet.power_off("h1")
    w.advance_to(120)
    assert sent(w, "start", "stop", "fence", "migrate") == []
    assert vm("vm1").state == "Running"  # nothing was done to it
    [item] = HaWork.objects.filter(instance__name="vm1")
    assert (item.step, item.reason) == (Step.DONE, Reason.OBSERVED)
    done = Event.objects.filter(subject="work", subject_id=item.pk, new=Step.DONE).get()
    assert "would" in done.message and "restart vm1 on h2" in done.message
    [inc] = Incident.objects.all()
    assert inc.state == "Resolved" and inc.declared_at is not None
    row = IncidentVm.objects.get(incident=inc, vm_name="vm1")
    assert row.outcome == "observed" and "restart vm1 on h2" in row.detail
    assert done.incident == inc
    # R17: the VM's HA status says it was only observed, and what would have been done.
    status = hastatus.status_of(vm("vm1"), now=w.clock.now())
    assert (status.code, status.cause) == ("waiting", WaitCause.OBSERVED)
    assert "would" in status.reason and "restart vm1 on h2" in status.reason
    # The mode is an alert while not armed, with its event.
    assert mode_alerts() == [("config", "installation")]
    assert Event.objects.filter(event="HaModeChanged", new="observe").exists()


def test_r26_disarmed_holds_new_work_and_rearming_restarts_it():
    """R26 disarmed: the host is still declared Down and its incident recorded, but
    its HA VM waits (HA status waiting/disarmed) and is not restarted; back to armed,
    every host and VM is re-examined and the VM restarted at once."""
    w = world({**TWO_HOSTS, "config": {"ha.mode": "disarmed"}})
    w.advance_to(15)
    w.fleet.power_off("h1")
    w.advance_to(200)
    assert sent(w, "start", "fence") == []
    status = hastatus.status_of(vm("vm1"), now=w.clock.now())
    assert (status.code, status.cause) == ("waiting", WaitCause.DISARMED)
    assert "disarmed" in status.reason
    assert Incident.objects.get().state == "Recovering"
    # One WorkRetry event for the whole hold, not one a minute.
    item = HaWork.objects.get(instance__name="vm1")
    assert Event.objects.filter(subject="work", subject_id=item.pk,
                                event="WorkRetry").count() == 1
    modes.set_mode("armed", now=w.clock.now(), by="test")
    assert mode_alerts() == []
    w.advance_to(205)
    v = vm("vm1")
    assert (v.state, v.host.name) == ("Running", "h2")
    assert Incident.objects.get().state == "Resolved"


def test_r26_back_to_armed_after_observe_schedules_vms_left_on_a_down_host():
    """R26: a host that failed in observe keeps its VMs recorded on it; returning to
    armed re-examines it (rearm) and restarts them — a function operators can trust."""
    w = world({**TWO_HOSTS, "config": {"ha.mode": "observe"}})
    w.advance_to(15)
    w.fleet.power_off("h1")
    w.advance_to(120)
    assert vm("vm1").state == "Running" and sent(w, "start") == []
    config.set_value("ha.mode", "armed", now=w.clock.now(), by="admin")  # as the admin page
    w.advance_to(130)
    v = vm("vm1")
    assert (v.state, v.host.name) == ("Running", "h2")
    assert mode_alerts() == [] and mode_alerts("resolved") == [("config", "installation")]
    assert Event.objects.filter(event="HaRearmed").exists()


def test_r26_rearm_is_a_no_op_when_nothing_waits():
    """R26: re-examining an installation where nothing failed schedules nothing."""
    w = world(TWO_HOSTS)
    w.advance_to(20)
    assert modes.rearm(now=w.clock.now()) == {"due": [], "hosts": [], "vms": []}
    assert not HaWork.objects.exists()


def test_r26_disarm_during_recovery_lets_items_past_investigating_finish():
    """R26: a disarm while a recovery is under way: an item already past Investigating
    (fencing) goes on — fences and restarts its VM."""
    w = world({**TWO_HOSTS, "config": {"restart.retry.interval": 30}})
    w.advance_to(15)
    w.fleet.network("h1", False)  # cut off, still powered: the VM's fate is unknown
    w.fleet.bmc("h1", False)  # and its BMC does not answer: fencing fails
    HaWork.objects.schedule_restart(vm("vm1"), investigate=True, reason=Reason.VM_POWER_OFF,
                                    now=w.clock.now())
    w.advance_to(16)
    item = HaWork.objects.get(instance__name="vm1")
    assert item.step == Step.FENCING and item.waiting == WaitCause.FENCING_FAILED
    modes.set_mode("disarmed", now=w.clock.now(), by="test")
    w.fleet.bmc("h1", True)
    w.advance_to(120)
    v = vm("vm1")
    assert (v.state, v.host.name) == ("Running", "h2")
    assert ("fence", "h1") in w.fleet.calls
    assert mode_alerts() == [("config", "installation")]


def test_r26_disarmed_item_not_past_investigating_waits():
    """R26: the same item still Investigating when HA is disarmed waits, untouched."""
    w = world(TWO_HOSTS)
    w.advance_to(15)
    modes.set_mode("disarmed", now=w.clock.now(), by="test")
    w.fleet.network("h1", False)
    HaWork.objects.schedule_restart(vm("vm1"), investigate=True, reason=Reason.VM_POWER_OFF,
                                    now=w.clock.now())
    w.advance_to(100)
    item = HaWork.objects.get(instance__name="vm1")
    assert (item.step, item.waiting) == (Step.INVESTIGATING, WaitCause.DISARMED)
    assert sent(w, "fence", "start", "stop") == []


def test_r26_cluster_override_beats_the_installation_mode():
    """R26: a cluster in observe records while the rest of the installation, armed,
    restarts; the override is its own alert (subject the cluster)."""
    spec = {
        "hosts": {"a1": {"cluster": "ca"}, "a2": {"cluster": "ca"},
                  "b1": {"cluster": "cb"}, "b2": {"cluster": "cb"}},
        "vms": {"va": {"host": "a1", "ha": True}, "vb": {"host": "b1", "ha": True}},
    }
    w = world(spec)
    modes.set_mode("observe", cluster="cb", now=w.clock.now(), by="test")
    assert mode_alerts() == [("cluster", "cb")]
    w.advance_to(15)
    w.fleet.power_off("a1")
    w.fleet.power_off("b1")
    w.advance_to(120)
    assert (vm("va").state, vm("va").host.name) == ("Running", "a2")
    assert HaWork.objects.get(instance__name="vb").reason == Reason.OBSERVED
    assert sent(w, "start") == [("start", "a2", "va")]
    # Back to inheriting (armed): vb is restarted too.
    modes.set_mode("", cluster="cb", now=w.clock.now(), by="test")
    w.advance_to(130)
    assert (vm("vb").state, vm("vb").host.name) == ("Running", "b2")


def test_r26_bad_modes_are_refused_and_change_nothing():
    """R26: a mode that does not exist, or a cluster that does not, is refused."""
    w = world(TWO_HOSTS)
    with pytest.raises(ConfigError, match="armed, observe, disarmed"):
        modes.set_mode("asleep", now=w.clock.now())
    with pytest.raises(ConfigError, match="unknown cluster"):
        modes.set_mode("observe", cluster="nowhere", now=w.clock.now())
    with pytest.raises(ConfigError):
        config.set_value("ha.mode", "paused", now=w.clock.now())
    assert config.get("ha.mode") == "armed" and mode_alerts() == []


# --- API and pages -----------------------------------------------------------------------

@pytest.fixture
def admin_client():
    c = Client()
    c.force_login(User.objects.create_user("root", is_staff=True))
    return c


@pytest.fixture
def viewer_client():
    c = Client()
    c.force_login(User.objects.create_user("viewer"))
    return c


def test_r26_api_reads_and_changes_the_mode(admin_client):
    """R26: GET/PUT /api/v1/ha-mode and PUT /api/v1/clusters/{name}/ha-mode."""
    world(TWO_HOSTS)
    r = admin_client.get("/api/v1/ha-mode")
    assert r.status_code == 200
    assert r.json()["mode"] == "armed" and r.json()["clusters"]["c1"]["mode"] == "armed"
    r = admin_client.put("/api/v1/ha-mode", {"mode": "observe"},
                         content_type="application/json")
    assert r.status_code == 200 and r.json()["mode"] == "observe"
    assert config.get("ha.mode") == "observe" and mode_alerts() == [("config", "installation")]
    r = admin_client.put("/api/v1/clusters/c1/ha-mode", {"mode": "disarmed"},
                         content_type="application/json")
    assert r.status_code == 200 and r.json()["clusters"]["c1"] == {
        "override": "disarmed", "mode": "disarmed"}
    r = admin_client.put("/api/v1/ha-mode", {"mode": "asleep"},
                         content_type="application/json")
    assert r.status_code == 400 and "armed, observe, disarmed" in r.json()["error"]
    r = admin_client.put("/api/v1/clusters/nowhere/ha-mode", {"mode": "armed"},
                         content_type="application/json")
    assert r.status_code in (400, 404) and "nowhere" in r.json()["error"]
    r = admin_client.put("/api/v1/ha-mode", "not json", content_type="application/json")
    assert r.status_code == 400
    assert config.get("ha.mode") == "observe"


def test_r26_api_mode_change_is_for_admins_only(viewer_client):
    world(TWO_HOSTS)
    assert viewer_client.get("/api/v1/ha-mode").status_code == 200
    r = viewer_client.put("/api/v1/ha-mode", {"mode": "disarmed"},
                          content_type="application/json")
    assert r.status_code == 403 and config.get("ha.mode") == "armed"


def test_r26_every_page_shows_a_banner_while_not_armed(admin_client):
    """R26: a banner on every page while a mode is not armed; none when armed."""
    w = world(TWO_HOSTS)
    page = admin_client.get("/").content.decode()
    assert "ha-mode-banner" not in page
    modes.set_mode("observe", cluster="c1", now=w.clock.now())
    for url in ("/", "/hosts", "/vms"):
        r = admin_client.get(url, follow=True)
        assert r.status_code == 200, url
        text = r.content.decode()
        assert "ha-mode-banner" in text and "observe" in text and "c1" in text, url


def test_r26_dashboard_changes_the_mode_after_a_confirmation(admin_client):
    """R26: the dashboard's mode page asks for a confirmation before it changes
    anything (no inline JS: a second form)."""
    world(TWO_HOSTS)
    r = admin_client.post("/ha-mode", {"mode": "disarmed", "cluster": ""})
    assert r.status_code == 200 and "Confirm" in r.content.decode()
    assert config.get("ha.mode") == "armed"  # not yet
    r = admin_client.post("/ha-mode", {"mode": "disarmed", "cluster": "", "confirm": "yes"})
    assert r.status_code in (200, 302)
    assert config.get("ha.mode") == "disarmed"
    r = admin_client.post("/ha-mode", {"mode": "nonsense", "cluster": "", "confirm": "yes"})
    assert r.status_code == 400 and config.get("ha.mode") == "disarmed"


def test_r26_cluster_mode_in_django_admin_is_an_event_and_an_alert():
    """R26: a cluster's mode set in Django admin goes through the same path: its event,
    its ha-mode alert; cleared, the alert resolves."""
    world(TWO_HOSTS)
    c = Client()
    c.force_login(User.objects.create_superuser("boss", "b@example.org", None))
    r = c.post("/admin/clusters/cluster/add/", {"name": "c1", "ha_mode": "disarmed"})
    assert r.status_code == 302, r.content.decode()[:500]
    assert modes.mode_for("c1", config.snapshot()) == "disarmed"
    assert mode_alerts() == [("cluster", "c1")]
    assert Event.objects.filter(event="ClusterChanged", subject_name="c1",
                                new="disarmed").exists()
    r = c.post("/admin/clusters/cluster/c1/change/", {"ha_mode": ""})
    assert r.status_code == 302
    assert mode_alerts() == [] and mode_alerts("resolved") == [("cluster", "c1")]


def test_r26_observed_vm_crash_is_one_incident_and_restarted_when_armed():
    """R26 observe, a VM that crashes on a healthy host: one VM incident, observed —
    not a new one at every report — the VM recorded Stopped (its host says it is off)
    and waiting, observed; armed again, it is restarted."""
    w = world({**TWO_HOSTS, "config": {"ha.mode": "observe"}})
    w.advance_to(15)
    w.fleet.vm_crash("vm1")
    w.advance_to(100)  # eight more reports of it powered off
    assert sent(w, "start", "stop") == []
    [inc] = Incident.objects.filter(kind="vm")
    assert inc.state == "Resolved" and inc.vms.get().outcome == "observed"
    assert HaWork.objects.filter(instance__name="vm1").count() == 1
    assert vm("vm1").state == "Stopped"
    status = hastatus.status_of(vm("vm1"), now=w.clock.now())
    assert (status.code, status.cause) == ("waiting", WaitCause.OBSERVED)
    modes.set_mode("armed", now=w.clock.now(), by="test")
    w.advance_to(105)
    assert vm("vm1").state == "Running"
    assert sent(w, "start")


def test_r26_r24_observe_predicts_the_spread_armed_mode_makes():
    """R26 with R24 (operator trial: every item of a host's failure said "would restart
    on kvm-012"): observe places a host's HA VMs as a batch, each seeing the ones before
    it, so what it records is the spread armed mode makes — never all on one host."""
    spec = {
        "config": {"ha.mode": "observe"},
        "hosts": {"h1": {"cpus": 16}, "h2": {"cpus": 8}, "h3": {"cpus": 8},
                  "h4": {"cpus": 8}},
        "vms": {f"v{i}": {"host": "h1", "ha": True, "cpus": 2} for i in range(6)},
    }
    w = world(spec)
    w.advance_to(15)
    w.fleet.power_off("h1")
    w.advance_to(150)
    assert sent(w, "start", "stop", "fence", "migrate") == []
    targets = list(IncidentVm.objects.filter(outcome="observed")
                   .values_list("target_host_name", flat=True))
    assert len(targets) == 6
    assert {t: targets.count(t) for t in set(targets)} == {"h2": 2, "h3": 2, "h4": 2}
