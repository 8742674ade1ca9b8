"""VM definitions and agent identity (PROTOCOL.md v1.1, issue 9 parts 1 and 5).

connect's optional ``agent`` block and per-VM ``definition``; a ping entry (HTTP,
websocket, batched ingest) may carry a changed definition; the server keeps the latest
definition of each VM it manages on the reporting host — never one from a host that
does not own the VM — and sends it with ``start``; operators read and set it through
``/api/v1/vms/{name}/definition`` (admins only for PUT).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.utils import timezone
from rest_framework.test import APIClient

from hadash.ha import actions
from hadash.models import ApiToken, Event
from hosts.agent import ingest, service
from hosts.agent_http import HttpAgentClient
from hosts.models import Host
from hosts.tests import agent_fixtures
from hosts.tests.agent_server import agent
from vms import definitions
from vms.choices import PowerState, VmState
from vms.models import VMInstance

# Shared fixtures (hosts/tests/agent_fixtures.py).
EARLIER = agent_fixtures.EARLIER
hosts = agent_fixtures.hosts
_fresh_discovery = agent_fixtures._fresh_discovery

CONNECT = "/api/agent/v1/connect"
PING = "/api/agent/v1/ping"
API = "/api/v1"


def domain(name: str, cpus: int = 2, memory_kib: int = 2097152, extra: str = "") -> str:
    return (f"<domain type='kvm'><name>{name}</name><vcpu>{cpus}</vcpu>"
            f"<memory unit='KiB'>{memory_kib}</memory>{extra}</domain>")


def d(xml: str) -> dict:
    return {"format": "libvirt-xml", "xml": xml}


def connect_body(name="kvm-01", address="10.0.0.11", vms=(), **extra) -> dict:
    body = {"name": name, "type": "Routing", "hypervisor": "KVM", "cluster": "c1",
            "cpus": 32, "memory_mb": 131072, "address": address,
            "agent_url": f"http://{address}:8250", "vms": list(vms)}
    body.update(extra)
    return body


def post(client, path, body, token):
    return client.post(path, data=json.dumps(body), content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {token}")


def stored(name: str) -> tuple[str, str, int | None]:
    return VMInstance.objects.filter(name=name).values_list(
        "definition_format", "definition_xml", "definition_host_id").get()


# --- connect ------------------------------------------------------------------


@pytest.mark.django_db
def test_connect_stores_definitions_and_agent_identity(client, agent_key):
    """v1.1 connect: per-VM definitions of the VMs hadash manages there are kept; the
    `agent` block is stored on the host and shown by GET /api/v1/hosts/{name}."""
    body = connect_body(vms=[], agent={"name": "hadash-agent", "version": "1.1.0",
                                       "hypervisor_uri": "qemu:///system"})
    r = post(client, CONNECT, body, agent_key)
    assert r.status_code == 200, r.content
    token = r.json()["token"]
    host = Host.objects.get(name="kvm-01")
    assert (host.agent_name, host.agent_version, host.agent_hypervisor_uri) == (
        "hadash-agent", "1.1.0", "qemu:///system")
    assert host.agent_kind == "agent"
    actions.register_vm(name="web-1", host_name="kvm-01", cpus=2, memory_mb=2048,
                        now=timezone.now())
    xml = domain("web-1")
    r = post(client, CONNECT, connect_body(vms=[
        {"name": "web-1", "power_state": "PowerOn", "definition": d(xml)}]), token)
    assert r.status_code == 200, r.content
    assert stored("web-1") == ("libvirt-xml", xml, host.pk)
    # A reconnect without the block: the identity is no longer known.
    host.refresh_from_db()
    assert host.agent_kind == ""

    staff = get_user_model().objects.create_user("ops", is_staff=True)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {ApiToken.issue(staff)[1]}")
    post(client, CONNECT, connect_body(agent={"name": "hadash-simulator", "version": "1.1",
                                              "hypervisor_uri": "simulated://kvm-01"}),
         token)
    shown = api.get(f"{API}/hosts/kvm-01").json()
    assert shown["agent_kind"] == "simulator"
    assert shown["agent_name"] == "hadash-simulator"
    assert shown["agent_hypervisor_uri"] == "simulated://kvm-01"
    for field in ("name", "status", "resource_state", "cluster", "last_ping", "cpus",
                  "memory_mb"):
        assert field in shown  # PROTOCOL.md shape kept


@pytest.mark.django_db
@pytest.mark.parametrize("agent_block, word", [
    ("hadash-agent", "agent must be an object"),
    ({"name": 7}, "agent.name must be a string"),
    ({"name": "x" * 65}, "agent.name is too long"),
    ({"name": "a\x00b"}, "control characters"),
    ({"version": "\ud800"}, "surrogate"),
])
def test_connect_with_a_bad_agent_block_is_refused(client, agent_key, agent_block, word):
    """v1.1: the agent block's strings are validated (type, length, text); a refused
    connect writes nothing."""
    r = post(client, CONNECT, connect_body(agent=agent_block), agent_key)
    assert r.status_code == 400
    assert word in r.json()["error"]
    assert not Host.objects.exists()


# --- ping (HTTP) ----------------------------------------------------------------


@pytest.mark.django_db
def test_http_ping_stores_a_changed_definition_and_keeps_it_without_one(client, hosts):
    """v1.1 ping: an entry's definition replaces the stored one (one event for the
    host); later pings without a definition leave it as it is."""
    a = hosts[0]
    r = post(client, PING, {"vms": [{"name": "web-1", "power_state": "PowerOn",
                                     "definition": d(domain("web-1"))}]}, a.token)
    assert r.status_code == 200, r.content
    assert stored("web-1")[1] == domain("web-1")
    newer = domain("web-1", cpus=4)
    post(client, PING, {"vms": [{"name": "web-1", "power_state": "PowerOn",
                                 "definition": d(newer)}]}, a.token)
    post(client, PING, {"vms": [{"name": "web-1", "power_state": "PowerOn"}]}, a.token)
    assert stored("web-1") == ("libvirt-xml", newer, a.pk)
    assert Event.objects.filter(event="DefinitionsStored", subject_id=a.pk).count() == 2
    # Unchanged: nothing written again.
    post(client, PING, {"vms": [{"name": "web-1", "power_state": "PowerOn",
                                 "definition": d(newer)}]}, a.token)
    assert Event.objects.filter(event="DefinitionsStored", subject_id=a.pk).count() == 2


@pytest.mark.django_db
def test_a_foreign_host_never_overwrites_a_definition(client, hosts):
    """Issue 9 (hijack): kvm-02 reports web-1 — placed on kvm-01 — with a definition of
    its own: ignored; kvm-01's definition stays."""
    a, b = hosts
    post(client, PING, {"vms": [{"name": "web-1", "power_state": "PowerOn",
                                 "definition": d(domain("web-1"))}]}, a.token)
    r = post(client, PING, {"vms": [{"name": "web-1", "power_state": "PowerOn",
                                     "definition": d(domain("web-1", extra="<evil/>"))}]},
             b.token)
    assert r.status_code == 200
    assert stored("web-1") == ("libvirt-xml", domain("web-1"), a.pk)


@pytest.mark.django_db
def test_last_host_owns_a_stopped_vms_definition(client, hosts):
    """A VM placed nowhere (Stopped) takes definitions from the host it last ran on
    only."""
    a, b = hosts
    VMInstance.objects.filter(name="web-1").update(state=VmState.STOPPED, host=None,
                                                   power_state=PowerState.POWER_OFF)
    post(client, PING, {"vms": [{"name": "web-1", "power_state": "PowerOff",
                                 "definition": d(domain("web-1", extra="<b/>"))}]}, b.token)
    assert stored("web-1")[0] == ""
    post(client, PING, {"vms": [{"name": "web-1", "power_state": "PowerOff",
                                 "definition": d(domain("web-1"))}]}, a.token)
    assert stored("web-1") == ("libvirt-xml", domain("web-1"), a.pk)


@pytest.mark.django_db
@pytest.mark.parametrize("bad", [
    {"format": "vmx", "xml": "<domain/>"},
    {"format": "libvirt-xml", "xml": "<domain>\x00</domain>"},
    {"format": "libvirt-xml", "xml": "<domain>\ud800</domain>"},
    {"format": "libvirt-xml", "xml": "<domain>" + "x" * (1024 * 1024) + "</domain>"},
    {"format": "libvirt-xml"},
    "libvirt-xml",
])
def test_a_bad_definition_is_dropped_and_the_power_report_still_taken(client, hosts, bad):
    """A definition that cannot be stored (format, NUL, surrogate, over 1 MiB, shape) is
    dropped; the report it came with is taken — a host is never left unheard over it
    (R8, R31) — and the other entries' definitions are stored."""
    a = hosts[0]
    VMInstance.objects.create(name="db-1", state=VmState.RUNNING, host=a, last_host=a,
                              power_state=PowerState.POWER_ON, power_host=a)
    r = post(client, PING, {"vms": [
        {"name": "web-1", "power_state": "PowerOff", "definition": bad},
        {"name": "db-1", "power_state": "PowerOn", "definition": d(domain("db-1"))},
    ]}, a.token)
    assert r.status_code == 200, r.content
    assert stored("web-1")[0] == ""
    assert stored("db-1")[1] == domain("db-1")
    assert VMInstance.objects.get(name="web-1").power_state == PowerState.POWER_OFF
    a.refresh_from_db()
    assert a.last_ping > EARLIER


# --- websocket and the batched ingest ---------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_websocket_ping_stores_a_definition(hosts):
    """v1.1 over the websocket (batched ingest): a ping entry's definition is stored."""
    from hadash.asgi import application

    a = hosts[0]

    async def run():
        comm = WebsocketCommunicator(application, "/api/agent/v1/ws", headers=[
            (b"host", b"testserver"), (b"authorization", f"Bearer {a.token}".encode())])
        connected, _ = await comm.connect(timeout=5)
        assert connected
        await comm.send_json_to({"type": "ping", "vms": [
            {"name": "web-1", "power_state": "PowerOn", "definition": d(domain("web-1"))}]})
        answer = await comm.receive_json_from(timeout=5)
        await comm.disconnect()
        return answer

    assert async_to_sync(run)()["type"] == "pong"
    assert stored("web-1") == ("libvirt-xml", domain("web-1"), a.pk)


@pytest.mark.django_db
def test_batch_stores_definitions_and_a_foreign_one_costs_no_one_anything(hosts):
    """The batched ingest (websocket path): a report with a definition is applied with
    its definition; another host's report in the same batch — even one naming the same
    VM with a definition of its own — is applied as usual, without touching it."""
    a, b = hosts
    report_a = service.VmReport([("web-1", "PowerOn")],
                                {"web-1": ("libvirt-xml", domain("web-1"))})
    report_b = service.VmReport([("web-1", "PowerOn")],
                                {"web-1": ("libvirt-xml", "<domain>hijack</domain>")})
    now = timezone.now()
    assert ingest.apply_batch([(a.token, report_a), (b.token, report_b)], now=now) == [10, 10]
    assert stored("web-1") == ("libvirt-xml", domain("web-1"), a.pk)
    a.refresh_from_db()
    b.refresh_from_db()
    assert a.last_ping == now and b.last_ping == now


def test_coalesced_reports_keep_the_definitions_of_the_report_they_replace():
    """A queued report replaced by a newer one of the same host (P5 coalescing) hands
    on its definitions — the agent sends a definition once, when it changes."""

    async def run():
        import asyncio

        applied = []
        started, release = asyncio.Event(), asyncio.Event()

        async def apply(items):
            applied.append(items)
            started.set()
            await release.wait()
            return [10] * len(items)

        async def record(*a, **k):
            return None

        b = ingest.Batcher(apply=apply, record=record)
        now = timezone.now()
        first = asyncio.ensure_future(b.submit("tok", [], now))
        await started.wait()
        older = service.VmReport([("vm", "PowerOn")], {"vm": ("libvirt-xml", "<domain/>")})
        waiting = [asyncio.ensure_future(b.submit("tok", older, now)),
                   asyncio.ensure_future(b.submit("tok", [("vm", "PowerOff")],
                                                  now + dt.timedelta(seconds=1)))]
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(first, *waiting)
        b.task.cancel()
        return applied

    applied = async_to_sync(run)()
    (token, report, _), = applied[1]
    assert list(report) == [("vm", "PowerOff")]
    assert service.definitions_of(report) == {"vm": ("libvirt-xml", "<domain/>")}


# --- start ------------------------------------------------------------------------------


class _Engine:
    def __init__(self, agents):
        self.agents = agents

    def now(self):
        return timezone.now()


@pytest.mark.django_db
def test_start_sends_the_stored_definition_over_http(hosts):
    """PROTOCOL.md v1.1 start: `definition` is sent when the server has one — here to a
    real HTTP agent (hosts/tests/agent_server.py) on the other host, kvm-02."""
    a, b = hosts
    xml = domain("web-1")
    VMInstance.objects.filter(name="web-1").update(
        state=VmState.STOPPED, host=None, power_state=PowerState.POWER_OFF,
        definition_format="libvirt-xml", definition_xml=xml, definition_host=a)
    Host.objects.filter(pk=a.pk).update(resource_state="Disabled")  # so it lands on kvm-02
    with contextlib.ExitStack() as stack:
        fake = stack.enter_context(agent("kvm-02", b.server_token))
        Host.objects.filter(pk=b.pk).update(agent_url=fake.url)
        client = stack.enter_context(HttpAgentClient(connect_timeout=1, action_timeout=5))
        vm = VMInstance.objects.get(name="web-1")
        vm = actions.start_vm(vm, engine=_Engine(client))
        starts = [s for s in fake.seen if s.path.endswith("/start")]
    assert (vm.state, vm.host.name) == (VmState.RUNNING, "kvm-02")
    assert len(starts) == 1
    assert starts[0].body["definition"] == {"format": "libvirt-xml", "xml": xml}
    assert starts[0].body["cpus"] == vm.cpus


@pytest.mark.django_db
def test_start_without_a_definition_sends_none(hosts):
    """No definition stored: `start` carries only the size (PROTOCOL.md v1 shape)."""
    a, b = hosts
    VMInstance.objects.filter(name="web-1").update(state=VmState.STOPPED, host=None,
                                                   power_state=PowerState.POWER_OFF)
    Host.objects.filter(pk=a.pk).update(resource_state="Disabled")
    with contextlib.ExitStack() as stack:
        fake = stack.enter_context(agent("kvm-02", b.server_token))
        Host.objects.filter(pk=b.pk).update(agent_url=fake.url)
        client = stack.enter_context(HttpAgentClient(connect_timeout=1, action_timeout=5))
        actions.start_vm(VMInstance.objects.get(name="web-1"), engine=_Engine(client))
        starts = [s for s in fake.seen if s.path.endswith("/start")]
    assert "definition" not in starts[0].body


# --- operator API ---------------------------------------------------------------------


def _client(user) -> APIClient:
    c = APIClient()
    c.credentials(HTTP_AUTHORIZATION=f"Bearer {ApiToken.issue(user)[1]}")
    return c


@pytest.fixture
def admin_api(db):
    return _client(get_user_model().objects.create_user("ops", is_staff=True))


@pytest.fixture
def reader_api(db):
    return _client(get_user_model().objects.create_user("viewer"))


@pytest.mark.django_db
def test_api_definition_get_and_put_with_roles(hosts, admin_api, reader_api):
    """GET/PUT /api/v1/vms/{name}/definition: anyone logged in reads, admins set (403
    for a read-only user, nothing changed); the VM's shape keeps its PROTOCOL.md fields
    and says has_definition."""
    r = reader_api.get(f"{API}/vms/web-1/definition")
    assert r.status_code == 404 and "no definition" in r.json()["error"]
    shown = reader_api.get(f"{API}/vms/web-1").json()
    assert shown["has_definition"] is False
    for field in ("name", "state", "power_state", "host", "last_host", "ha_enabled",
                  "priority", "cpus", "memory_mb"):
        assert field in shown
    xml = domain("web-1")
    r = reader_api.put(f"{API}/vms/web-1/definition", d(xml), format="json")
    assert r.status_code == 403
    assert stored("web-1")[0] == ""
    r = admin_api.put(f"{API}/vms/web-1/definition", d(xml), format="json")
    assert r.status_code == 200, r.content
    assert r.json()["xml"] == xml and r.json()["by"] == "ops" and r.json()["host"] is None
    got = reader_api.get(f"{API}/vms/web-1/definition").json()
    assert (got["format"], got["xml"]) == ("libvirt-xml", xml)
    assert reader_api.get(f"{API}/vms/web-1").json()["has_definition"] is True
    assert Event.objects.filter(event="DefinitionChanged", subject_name="web-1").count() == 1
    assert admin_api.get(f"{API}/vms/nope/definition").status_code == 404


@pytest.mark.django_db
@pytest.mark.parametrize("body, word", [
    ({"format": "vmx", "xml": "<domain/>"}, "format"),
    ({"format": "libvirt-xml", "xml": "<domain>\x01</domain>"}, "control characters"),
    ({"format": "libvirt-xml", "xml": "x" * (1024 * 1024 + 1)}, "too large"),
    ({"format": "libvirt-xml", "xml": "<domain/>", "extra": 1}, "unknown field"),
    ({"xml": "<domain/>"}, "format"),
])
def test_api_definition_put_refuses_bad_input(hosts, admin_api, body, word):
    """A definition the API cannot store is a 400 naming why; nothing changes."""
    r = admin_api.put(f"{API}/vms/web-1/definition", body, format="json")
    assert r.status_code == 400, r.content
    assert word in json.dumps(r.json())
    assert stored("web-1")[0] == ""


@pytest.mark.django_db
def test_api_definition_body_over_the_limit_is_413(hosts, admin_api):
    """The definition's body limit (2 MiB) is larger than the API's 64 KiB, and still
    refused from its Content-Length."""
    big = json.dumps(d("x" * (3 * 1024 * 1024)))
    r = admin_api.generic("PUT", f"{API}/vms/web-1/definition", big,
                          content_type="application/json")
    assert r.status_code == 413
    r = admin_api.put(f"{API}/vms/web-1/definition", d("<domain>" + "y" * 200_000 +
                                                          "</domain>"), format="json")
    assert r.status_code == 200  # above 64 KiB, within the definition limit


def test_size_of_reads_vcpu_and_memory():
    assert definitions.size_of(domain("x", cpus=3, memory_kib=1048576)) == (3, 1024)
    assert definitions.size_of("<domain><memory unit='GiB'>2</memory></domain>") == (None,
                                                                                      2048)
    assert definitions.size_of("<!DOCTYPE x [<!ENTITY a 'b'>]><domain/>") == (None, None)
    assert definitions.size_of("not xml") == (None, None)
