"""Many hosts' settings in one request, `POST /api/v1/hosts/bulk` (issue 12: the
simulator sets 10,000 hosts' BMC settings): each item validated as
`PATCH /api/v1/hosts/{name}` validates it, the list as a whole (every bad item named,
nothing written), each change committed with the single PATCH's `SettingsChanged` event
(SPEC §1, §6), a number of queries that does not grow with the list on PostgreSQL."""

from __future__ import annotations

import json

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from hadash.api.guard import MAX_BODY_BYTES, body_limit
from hadash.api.serializers import MAX_HOST_BULK
from hadash.models import Event
from hadash.tests.test_api import make_host, state
from hosts.choices import HostStatus, ResourceState
from hosts.models import Host

pytestmark = pytest.mark.django_db

API = "/api/v1"


def bmc(name, **kw):
    return {"name": name, "oobm_enabled": True, "oobm_address": f"https://10.0.1.1/{name}",
            "oobm_system_id": name, "oobm_username": "root", "oobm_password": "pw", **kw}


def bulk(api, items):
    return api.post(f"{API}/hosts/bulk", {"hosts": items}, format="json")


def make_hosts(n, prefix="kvm-"):
    now = timezone.now()
    Host.objects.bulk_create(
        Host(name=f"{prefix}{i:05d}", status=HostStatus.UP,
             resource_state=ResourceState.ENABLED, cluster="c1", cpus=32,
             memory_mb=131072, last_ping=now, agent_url=f"http://{prefix}{i:05d}:8250")
        for i in range(n))
    return [f"{prefix}{i:05d}" for i in range(n)]


def test_a_good_batch_sets_every_host_with_its_event(api):
    names = make_hosts(30)
    r = bulk(api, [bmc(n) for n in names])
    assert r.status_code == 200, r.content
    assert r.json() == {"count": 30, "changed": names}
    for h in Host.objects.all():
        assert (h.oobm_enabled, h.oobm_address, h.oobm_system_id, h.oobm_username,
                h.oobm_password) == (True, f"https://10.0.1.1/{h.name}", h.name, "root", "pw")
    events = Event.objects.filter(event="SettingsChanged")
    assert sorted(events.values_list("subject_name", flat=True)) == names
    assert all("pw'" not in e.message for e in events)
    # The single GET sees it as the single PATCH would have left it.
    one = api.get(f"{API}/hosts/kvm-00003").json()
    assert (one["oobm_enabled"], one["oobm_password_set"]) == (True, True)
    assert "oobm_password" not in one
    # Again: nothing changes, no event.
    r = bulk(api, [bmc(n) for n in names])
    assert r.json() == {"count": 30, "changed": []}
    assert events.count() == 30


def test_each_host_gets_the_event_the_single_patch_writes(api):
    """The same body for twin hosts, one by PATCH, one by bulk: the same row (and the
    same stored settings), but for the host's own name and id."""
    make_host("kvm-01")
    make_host("kvm-02")
    body = {"tags": ["ssd", "ha"], "oobm_enabled": True, "oobm_address": "https://10.0.1.11",
            "oobm_system_id": "sys", "oobm_username": "root", "oobm_password": "pw"}
    assert api.patch(f"{API}/hosts/kvm-01", body, format="json").status_code == 200
    assert bulk(api, [{"name": "kvm-02", **body}]).status_code == 200
    by_patch, by_bulk = (Event.objects.get(event="SettingsChanged", subject_name=n)
                         for n in ("kvm-01", "kvm-02"))
    skip = {"id", "time", "subject_id", "subject_name", "message", "host_id"}

    def fields(e):
        return {f.attname: getattr(e, f.attname) for f in Event._meta.concrete_fields
                if f.attname not in skip}

    assert fields(by_bulk) == fields(by_patch)
    assert by_bulk.message == by_patch.message.replace("kvm-01", "kvm-02")
    assert "oobm_password changed" in by_bulk.message and "by ops" in by_bulk.message
    assert (by_bulk.subject_id, by_bulk.host_id) == (Host.objects.get(name="kvm-02").pk,) * 2
    one, two = (Host.objects.filter(name=n).values(*body).get() for n in ("kvm-01", "kvm-02"))
    assert one == two
    # One field: old and new in the event, as the single PATCH writes them.
    assert bulk(api, [{"name": "kvm-02", "oobm_username": "admin"}]).status_code == 200
    e = Event.objects.filter(subject_name="kvm-02").latest("id")
    assert (e.field, e.old, e.new) == ("oobm_username", "root", "admin")


def test_only_each_hosts_changed_fields_are_written(api):
    """Items may set different fields; a host's other fields stay as they are (the
    CASE per column on PostgreSQL, a bulk_update per set of fields elsewhere)."""
    make_host("kvm-01", tags="old", oobm_username="keep")
    make_host("kvm-02", tags="old", oobm_username="keep")
    make_host("kvm-03", tags="same")
    r = bulk(api, [{"name": "kvm-01", "tags": ["new"]},
                   {"name": "kvm-02", "oobm_username": "admin"},
                   {"name": "kvm-03", "tags": "same"}])
    assert r.status_code == 200, r.content
    assert r.json()["changed"] == ["kvm-01", "kvm-02"]
    got = dict(Host.objects.values_list("name", "tags"))
    assert got == {"kvm-01": "new", "kvm-02": "old", "kvm-03": "same"}
    got = dict(Host.objects.values_list("name", "oobm_username"))
    assert got == {"kvm-01": "keep", "kvm-02": "admin", "kvm-03": ""}
    assert Event.objects.filter(event="SettingsChanged").count() == 2


@pytest.mark.parametrize("bad, word", [
    (bmc("kvm-00004", oobm_address="not a url"), "oobm_address"),
    ({"name": "kvm-00004", "oobm_enabled": True}, "needs oobm_address"),
    ({"name": "kvm-00004", "status": "Up"}, "cannot set status"),
    ({"name": "kvm-00004", "tags": 5}, "tags"),
    (bmc("nope"), "no host named 'nope'"),
    (bmc("kvm-00000"), "more than once"),
    ("not an object", "object"),
    ({"oobm_username": "x"}, "name"),
    ({"name": 7}, "name must be a string"),
    ({"name": "bad\x00name"}, "no host named"),
])
def test_one_bad_item_anywhere_refuses_the_batch_naming_it(api, bad, word):
    make_hosts(10)
    before = state()
    items = [bmc(f"kvm-{i:05d}") for i in range(10) if i != 4]
    items.insert(6, bad)
    r = bulk(api, items)
    assert r.status_code == 400, r.content
    body = r.json()
    assert [e["index"] for e in body["errors"]] == [6]
    assert word in body["errors"][0]["error"] and word in body["error"]
    assert "hosts[6]" in body["error"]
    assert body["error"].startswith("1 of 10 hosts cannot be changed, nothing was written")
    assert state() == before


def test_every_bad_item_is_listed(api):
    make_hosts(3)
    before = state()
    items = [bmc("kvm-00000"), bmc("ghost"), bmc("kvm-00000"),
             bmc("kvm-00001", oobm_enabled="maybe"), bmc("kvm-00002")]
    r = bulk(api, items)
    assert r.status_code == 400
    errors = r.json()["errors"]
    assert [(e["index"], e["name"]) for e in errors] == [
        (1, "ghost"), (2, "kvm-00000"), (3, "kvm-00001")]
    assert "first at index 0" in errors[1]["error"]
    assert "oobm_enabled" in errors[2]["error"]
    assert state() == before


@pytest.mark.parametrize("body, word", [
    ({}, '"hosts"'),
    ({"hosts": {}}, "must be a list"),
    ({"hosts": []}, "empty"),
    ([bmc("kvm-01")], '"hosts"'),
])
def test_a_body_that_is_not_a_list_of_hosts_is_400(api, body, word):
    make_host("kvm-01")
    before = state()
    r = api.post(f"{API}/hosts/bulk", body, format="json")
    assert r.status_code == 400
    assert word in r.json()["error"]
    assert state() == before


def test_a_list_above_the_cap_is_400(api):
    make_host("kvm-01")
    before = state()
    r = bulk(api, [{"name": "kvm-01", "tags": "x"}] * (MAX_HOST_BULK + 1))
    assert r.status_code == 400
    assert f"at most {MAX_HOST_BULK}" in r.json()["error"]
    assert "too many hosts" in r.json()["error"]
    assert state() == before


def test_wrong_token_is_401_and_a_reader_is_403(ro_api):
    make_host("kvm-01")
    before = state()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Bearer wrong")
    r = bulk(client, [bmc("kvm-01")])
    assert r.status_code == 401 and "error" in r.json()
    r = bulk(ro_api, [bmc("kvm-01")])
    assert r.status_code == 403 and "read-only" in r.json()["error"]
    assert state() == before


def test_a_large_batch_fits_in_the_body_limit(api):
    """2,000 hosts' BMC settings (the simulator's chunk) are ~300 KB of JSON: more than
    other API bodies may be; the path takes what vms/bulk takes."""
    assert body_limit(f"{API}/hosts/bulk/") == MAX_BODY_BYTES  # only the path itself
    assert body_limit(f"{API}/hosts/bulk") > 16 * MAX_BODY_BYTES
    names = make_hosts(2000)
    items = [bmc(n) for n in names]
    assert len(json.dumps({"hosts": items})) > MAX_BODY_BYTES
    r = bulk(api, items)
    assert r.status_code == 200, r.content[:300]
    assert len(r.json()["changed"]) == 2000
    assert Host.objects.filter(oobm_enabled=True).count() == 2000
    assert Event.objects.filter(event="SettingsChanged").count() == 2000


@pytest.mark.postgres_only
def test_the_number_of_queries_does_not_grow_with_the_batch(api,
                                                            django_assert_max_num_queries):
    names = make_hosts(210)

    with CaptureQueriesContext(connection) as q:
        assert bulk(api, [bmc(n) for n in names[:10]]).status_code == 200
    small = len(q.captured_queries)
    items = [bmc(n) for n in names[10:]]
    items[::2] = [{"name": i["name"], "tags": "x"} for i in items[::2]]  # CASE per column
    with django_assert_max_num_queries(small):
        r = bulk(api, items)
    assert r.status_code == 200 and len(r.json()["changed"]) == 200
    assert Event.objects.filter(event="SettingsChanged").count() == 210


def test_a_host_named_bulk_can_still_be_read_and_changed(api):
    make_host("bulk")
    assert api.get(f"{API}/hosts/bulk").json()["name"] == "bulk"
    r = api.patch(f"{API}/hosts/bulk", {"tags": ["gpu"]}, format="json")
    assert r.status_code == 200 and r.json()["tags"] == ["gpu"]
    r = bulk(api, [{"name": "bulk", "tags": ["ssd"]}])
    assert r.json()["changed"] == ["bulk"]
    assert Host.objects.get(name="bulk").tags == "ssd"


def test_openapi_describes_the_bulk_call():
    doc = json.loads(APIClient().get(f"{API}/openapi.json").content)
    op = doc["paths"]["/api/v1/hosts/bulk"]
    assert set(op) == {"post"}
    assert {"200", "400", "401", "403", "409"} <= set(op["post"]["responses"])
    assert {"get", "patch"} <= set(doc["paths"]["/api/v1/hosts/{name}"])
