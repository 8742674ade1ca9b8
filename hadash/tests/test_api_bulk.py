"""Bulk registration (`POST /api/v1/vms/bulk`) and bulk adoption
(`POST /api/v1/unmanaged-vms/adopt`) through the operator API (issue 12, target 4): a
list in one request, validated as a whole (every bad item named, nothing written),
admission (R23) judged for the request as a whole, one transaction."""

from __future__ import annotations

import json

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from hadash import config
from hadash.models import Event
from hadash.tests.test_api import make_host, make_vm, state
from hosts.models import Host
from vms.models import UnmanagedVm, VMInstance

pytestmark = pytest.mark.django_db

API = "/api/v1"


def vm(name, host="kvm-01", **kw):
    return {"name": name, "host": host, "cpus": 1, "memory_mb": 512, **kw}


def bulk(api, items):
    return api.post(f"{API}/vms/bulk", {"vms": items}, format="json")


def test_a_good_batch_registers_every_vm_with_its_event(api):
    make_host("kvm-01")
    make_host("kvm-02")
    items = [vm(f"web-{i}", host=f"kvm-0{1 + i % 2}", ha_enabled=i % 2 == 0,
                priority="high" if i == 3 else "medium") for i in range(50)]
    r = bulk(api, items)
    assert r.status_code == 201, r.content
    assert r.json() == {"count": 50, "names": [f"web-{i}" for i in range(50)]}
    got = {v.name: v for v in VMInstance.objects.select_related("host")}
    assert len(got) == 50
    assert (got["web-3"].state, got["web-3"].power_state, got["web-3"].host.name,
            got["web-3"].ha_enabled, got["web-3"].priority) == (
        "Running", "PowerOn", "kvm-02", False, "high")
    assert got["web-0"].ha_enabled and got["web-0"].host.name == "kvm-01"
    # Each VM as POST /api/v1/vms registers it: seen the same by a reader.
    one = api.get(f"{API}/vms/web-3").json()
    assert (one["state"], one["host"], one["last_host"], one["power_host"],
            one["cpus"], one["memory_mb"], one["type"]) == (
        "Running", "kvm-02", "kvm-02", "kvm-02", 1, 512, "User")
    events = Event.objects.filter(subject="vm", event="Registered")
    assert sorted(events.values_list("subject_name", flat=True)) == sorted(got)
    e = events.get(subject_name="web-3")
    assert (e.vm_id, e.host_id, e.new, e.message) == (
        got["web-3"].pk, got["web-3"].host_id, "Running",
        "VM web-3 registered, Running on kvm-02")


def test_the_number_of_queries_does_not_grow_with_the_batch(api):
    make_host("kvm-01")

    def queries(items):
        with CaptureQueriesContext(connection) as q:
            assert bulk(api, items).status_code == 201
        return len(q.captured_queries)

    small = queries([vm(f"a-{i}") for i in range(5)])
    if connection.vendor == "postgresql":  # SQLite: one INSERT per ~50 rows
        assert queries([vm(f"b-{i}") for i in range(500)]) == small


@pytest.mark.parametrize("bad, word", [
    (vm("x", host="nope"), "unknown host 'nope'"),
    (vm("web-1", cpus=0), "cpus"),
    (vm("bad name!"), "name"),
    ({"name": "x", "host": "kvm-01"}, "cpus"),
    (vm("x", priority="urgent"), "priority"),
    ("not an object", "dictionary"),
    (vm("old-1"), "already exists"),
    (vm("web-0"), "more than once"),
])
def test_one_bad_item_anywhere_refuses_the_batch_naming_it(api, bad, word):
    host = make_host("kvm-01")
    make_vm("old-1", host)
    before = state()
    items = [vm(f"web-{i}") for i in range(10)]
    items.insert(6, bad)
    r = bulk(api, items)
    assert r.status_code == 400, r.content
    body = r.json()
    assert [e["index"] for e in body["errors"]] == [6]
    assert word in body["errors"][0]["error"] and word in body["error"]
    assert "vms[6]" in body["error"]
    assert state() == before


def test_every_bad_item_is_listed(api):
    make_host("kvm-01")
    before = state()
    items = [vm("a"), vm("b", host="nope"), vm("a"), vm("c", cpus="two"), vm("d")]
    r = bulk(api, items)
    assert r.status_code == 400
    errors = r.json()["errors"]
    assert [(e["index"], e["name"]) for e in errors] == [(1, "b"), (2, "a"), (3, "c")]
    assert "first at index 0" in errors[1]["error"]
    assert r.json()["error"].startswith("3 of 5 VMs cannot be registered")
    assert state() == before


@pytest.mark.parametrize("body, word", [
    ({}, '"vms"'),
    ({"vms": {}}, "must be a list"),
    ({"vms": []}, "empty"),
    ([vm("a")], '"vms"'),
])
def test_a_body_that_is_not_a_list_of_vms_is_400(api, body, word):
    make_host("kvm-01")
    r = api.post(f"{API}/vms/bulk", body, format="json")
    assert r.status_code == 400
    assert word in r.json()["error"]
    assert not VMInstance.objects.exists()


def test_a_list_above_the_cap_is_400(api):
    from hadash.api.serializers import MAX_BULK

    make_host("kvm-01")
    r = bulk(api, [vm(f"v{i}") for i in range(MAX_BULK + 1)])
    assert r.status_code == 400
    assert f"at most {MAX_BULK}" in r.json()["error"]
    assert not VMInstance.objects.exists()


def test_admission_enforce_judges_the_batch_as_a_whole_and_writes_nothing(api):
    """R23 enforce: each VM alone would keep the cluster's level, the batch would not
    (if kvm-01 failed, its four HA VMs would not fit on kvm-02): 409, nothing written."""
    now = timezone.now()
    config.set_value("ha.admission", "enforce", now=now, by="test")
    make_host("kvm-01", cpus=8, memory_mb=65536)
    make_host("kvm-02", cpus=8, memory_mb=65536)
    before = state()
    items = [vm(f"ha-{i}", cpus=2, ha_enabled=True) for i in range(4)]
    items.append(vm("ha-9", host="kvm-02", cpus=2, ha_enabled=True))
    r = bulk(api, items)
    assert r.status_code == 409, r.content
    assert "refused by admission control" in r.json()["error"]
    assert "the 5 VMs of this request" in r.json()["error"]
    assert state() == before
    # The first VM alone keeps the level.
    assert bulk(api, items[:1]).status_code == 201
    # Not HA: never refused.
    r = bulk(api, [vm(f"plain-{i}", cpus=2) for i in range(5)])
    assert r.status_code == 201


def test_wrong_token_is_401_and_a_reader_is_403(ro_api):
    make_host("kvm-01")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Bearer wrong")
    r = bulk(client, [vm("a")])
    assert r.status_code == 401 and "error" in r.json()
    r = bulk(ro_api, [vm("a")])
    assert r.status_code == 403
    assert not VMInstance.objects.exists()


def test_a_large_batch_fits_in_the_body_limit(api):
    """10,000 VMs are about a megabyte of JSON: more than other API bodies may be."""
    for i in range(10):
        make_host(f"kvm-{i:02d}")
    items = [vm(f"vm-{i:05d}", host=f"kvm-{i % 10:02d}", ha_enabled=True)
             for i in range(10_000)]
    assert len(json.dumps({"vms": items})) > 64 * 1024
    r = bulk(api, items)
    assert r.status_code == 201, r.content[:300]
    assert r.json()["count"] == 10_000
    assert VMInstance.objects.count() == 10_000
    assert Event.objects.filter(event="Registered").count() == 10_000


def test_a_vm_named_bulk_can_still_be_read_and_changed(api):
    make_vm("bulk", make_host("kvm-01"))
    assert api.get(f"{API}/vms/bulk").json()["name"] == "bulk"
    r = api.patch(f"{API}/vms/bulk", {"priority": "low"}, format="json")
    assert r.status_code == 200 and r.json()["priority"] == "low"


def test_openapi_describes_the_bulk_call():
    doc = json.loads(APIClient().get(f"{API}/openapi.json").content)
    op = doc["paths"]["/api/v1/vms/bulk"]
    assert set(op) == {"post"}
    assert {"201", "400", "401", "403", "409"} <= set(op["post"]["responses"])


# --- adoption -------------------------------------------------------------------------


def unmanaged(host, name, power="PowerOn", xml=""):
    return UnmanagedVm.objects.create(
        host=host, name=name, power_state=power, first_seen=timezone.now(),
        last_seen=timezone.now(), definition_format="libvirt-xml" if xml else "",
        definition_xml=xml)


XML = ("<domain type='kvm'><name>{n}</name><vcpu>3</vcpu>"
       "<memory unit='MiB'>1024</memory></domain>")


def adopt(api, items):
    return api.post(f"{API}/unmanaged-vms/adopt", {"vms": items}, format="json")


def test_bulk_adoption_adopts_many_in_one_request(api):
    a, b = make_host("kvm-01"), make_host("kvm-02")
    for i in range(20):
        unmanaged(a if i % 2 else b, f"legacy-{i}")
    unmanaged(a, "legacy-def", xml=XML.format(n="legacy-def"))
    unmanaged(a, "legacy-off", power="PowerOff")
    items = [{"name": f"legacy-{i}", "host": "kvm-01" if i % 2 else "kvm-02", "cpus": 1,
              "memory_mb": 256, "ha_enabled": True} for i in range(20)]
    items += [{"name": "legacy-def", "host": "kvm-01"},
              {"name": "legacy-off", "host": "kvm-01", "cpus": 1, "memory_mb": 256}]
    r = adopt(api, items)
    assert r.status_code == 201, r.content
    got = {v["name"]: v for v in r.json()}
    assert len(got) == 22
    assert (got["legacy-def"]["cpus"], got["legacy-def"]["memory_mb"],
            got["legacy-def"]["has_definition"]) == (3, 1024, True)
    assert (got["legacy-off"]["state"], got["legacy-off"]["host"],
            got["legacy-off"]["last_host"]) == ("Stopped", None, "kvm-01")
    assert got["legacy-4"]["state"] == "Running" and got["legacy-4"]["host"] == "kvm-02"
    assert not UnmanagedVm.objects.exists()
    assert Event.objects.filter(event="Registered").count() == 22
    off = Event.objects.get(event="Adopted", subject_name="legacy-off")
    assert (off.old, off.new) == ("Running", "Stopped")
    assert "adopted by" in Event.objects.get(subject_name="legacy-3").message


def test_bulk_adoption_lists_every_bad_entry_and_writes_nothing(api):
    a = make_host("kvm-01")
    make_host("kvm-02")
    unmanaged(a, "legacy-1")
    unmanaged(a, "legacy-2")
    unmanaged(a, "legacy-3")
    before = (VMInstance.objects.count(), Event.objects.count(), UnmanagedVm.objects.count())
    r = adopt(api, [{"name": "legacy-1", "host": "kvm-01", "cpus": 1, "memory_mb": 1},
                    {"name": "legacy-2", "host": "kvm-02", "cpus": 1, "memory_mb": 1},
                    {"name": "legacy-3", "host": "kvm-01"},
                    {"name": "legacy-1", "host": "kvm-01", "cpus": 1, "memory_mb": 1}])
    assert r.status_code == 400
    errors = {e["index"]: e["error"] for e in r.json()["errors"]}
    assert set(errors) == {1, 2, 3}
    assert "no such unmanaged VM" in errors[1]
    assert "cpus and memory_mb" in errors[2]
    assert "more than once" in errors[3]
    assert (VMInstance.objects.count(), Event.objects.count(),
            UnmanagedVm.objects.count()) == before


def test_single_adoption_still_works(api):
    unmanaged(make_host("kvm-01"), "legacy-1")
    r = adopt(api, [{"name": "legacy-1", "host": "kvm-01", "cpus": 2, "memory_mb": 512}])
    assert r.status_code == 201
    assert [v["name"] for v in r.json()] == ["legacy-1"]
    assert Host.objects.get(name="kvm-01").vms.get().name == "legacy-1"


def test_items_in_any_form_post_vms_takes_are_taken(api):
    """Plain JSON items take the quick check; others (a boolean as "true", a number as
    "2") go through the same validation as POST /api/v1/vms, and register the same."""
    make_host("kvm-01")
    r = bulk(api, [vm("plain", ha_enabled=True, priority="low", type="User"),
                   vm("texty", cpus="2", ha_enabled="true")])
    assert r.status_code == 201, r.content
    got = {v.name: (v.cpus, v.ha_enabled, v.priority, v.type)
           for v in VMInstance.objects.all()}
    assert got == {"plain": (1, True, "low", "User"), "texty": (2, True, "medium", "User")}
    assert all(len(str(v.uuid)) == 36 for v in VMInstance.objects.all())
