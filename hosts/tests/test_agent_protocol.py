"""Agent protocol over HTTP (PROTOCOL.md): connect, ping, disconnect — parsing,
validation, authentication and responses. The HA behaviour behind them (R1, R6–R8)
is the service's; these tests check the wire contract and that a rejected request
changes nothing."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from hadash import config
from hadash.models import Event, HaWork
from hosts.agent import validation
from hosts.agent.auth import bearer, host_for_token, is_join_key
from hosts.agent.validation import ProtocolError
from hosts.choices import HostStatus
from hosts.models import Host
from vms.choices import PowerState, VmState
from vms.models import VMInstance

CONNECT = "/api/agent/v1/connect"
PING = "/api/agent/v1/ping"
DISCONNECT = "/api/agent/v1/disconnect"

EARLIER = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def connect_body(name: str = "kvm-01", **overrides) -> dict:
    body = {
        "name": name,
        "type": "Routing",
        "hypervisor": "KVM",
        "cluster": "c1",
        "cpus": 32,
        "memory_mb": 131072,
        "address": "10.0.0.11",
        "agent_url": "http://10.0.0.11:8250",
        "vms": [],
    }
    body.update(overrides)
    return body


def post(client, path: str, body, token: str | None = None, content_type="application/json"):
    """POST ``body`` (a dict/list is JSON-encoded; str/bytes are sent as they are)."""
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    extra = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token is not None else {}
    return client.post(path, data=data, content_type=content_type, **extra)


def db_state() -> dict:
    """Everything an agent request could change, to compare before and after."""
    return {
        "hosts": list(Host.objects.order_by("pk").values()),
        "vms": list(VMInstance.objects.order_by("pk").values()),
        "events": Event.objects.count(),
        "ha_work": HaWork.objects.count(),
    }


@pytest.fixture
def host():
    """An Up host with a VM Running on it, created directly (not through connect) so
    the rejection tests do not depend on the service. ``host.token`` is its token."""
    h = Host(
        name="kvm-01",
        status=HostStatus.UP,
        cluster="c1",
        cpus=32,
        memory_mb=131072,
        private_ip_address="10.0.0.11",
        agent_url="http://10.0.0.11:8250",
        last_ping=EARLIER,
    )
    token, _ = h.issue_credentials()
    h.save()
    VMInstance.objects.create(
        name="i-2-10-VM",
        state=VmState.RUNNING,
        host=h,
        power_state=PowerState.POWER_ON,
        power_host=h,
        power_state_update_time=EARLIER,
        ha_enabled=True,
    )
    h.token = token
    return h


# --- connect --------------------------------------------------------------------------


@pytest.mark.django_db
def test_connect_with_join_key_creates_host_up_with_token(client, agent_key):
    """R1/R29/R30: an agent enrols with the join key; the host is created Up and gets a
    random token (only its hash is stored) and a server_token."""
    resp = post(client, CONNECT, connect_body(), agent_key)
    assert resp.status_code == 200, resp.content
    body = resp.json()
    assert set(body) == {"host_id", "token", "server_token", "ping_interval"}
    assert body["ping_interval"] == 10
    host = Host.objects.get(pk=body["host_id"])
    assert host.name == "kvm-01"
    assert host.status == HostStatus.UP
    assert host.cluster == "c1" and host.cpus == 32 and host.memory_mb == 131072
    assert host.agent_url == "http://10.0.0.11:8250"
    assert isinstance(body["token"], str) and len(body["token"]) >= 43  # ≥ 32 bytes
    assert host.token_matches(body["token"])
    assert host.token_hash != body["token"]  # only the hash is stored
    assert body["token"] not in str(list(Host.objects.values()))
    assert host_for_token(body["token"]) == host
    assert body["server_token"] == host.server_token != body["token"]


@pytest.mark.django_db
def test_join_key_naming_an_enrolled_host_is_409(client, agent_key):
    """R29: the join key enrols new names only; naming an enrolled host is 409, and the
    host keeps its row and token (the first agent still pings)."""
    first = post(client, CONNECT, connect_body(), agent_key).json()
    before = db_state()
    resp = post(client, CONNECT, connect_body(cpus=48), agent_key)
    assert resp.status_code == 409
    assert resp.json() == {"error": "host kvm-01 is already enrolled; it reconnects with its "
                                    "own token, or an operator re-enrols it"}
    assert db_state() == before
    assert post(client, PING, {"vms": []}, first["token"]).status_code == 200


@pytest.mark.django_db
def test_reconnect_with_host_token(client, agent_key):
    """R6: a known host reconnects with its own token: same row, same token echoed
    back (not rotated), same server_token."""
    first = post(client, CONNECT, connect_body(), agent_key).json()
    resp = post(client, CONNECT, connect_body(cpus=48), first["token"])
    assert resp.status_code == 200, resp.content
    second = resp.json()
    assert second["host_id"] == first["host_id"]
    assert second["token"] == first["token"]
    assert second["server_token"] == first["server_token"]
    assert Host.objects.get(name="kvm-01").cpus == 48
    assert post(client, PING, {"vms": []}, first["token"]).status_code == 200


@pytest.mark.django_db
def test_host_token_cannot_connect_another_host(client, host):
    """A host token only reconnects its own host: 401, nothing written."""
    before = db_state()
    resp = post(client, CONNECT, connect_body(name="kvm-99"), host.token)
    assert resp.status_code == 401
    assert "error" in resp.json()
    assert db_state() == before


@pytest.mark.django_db
@pytest.mark.parametrize(
    "header",
    [None, "Bearer wrong-key", "Basic aGFkYXNoOmtleQ==", "Bearer", "wrong-key"],
    ids=["missing", "wrong-key", "basic", "empty-bearer", "no-scheme"],
)
def test_connect_wrong_credentials_401_and_no_host(client, header):
    """Missing or wrong join key → 401 with an error, and no Host row (nor event) written."""
    extra = {"HTTP_AUTHORIZATION": header} if header is not None else {}
    resp = client.post(
        CONNECT, data=json.dumps(connect_body()), content_type="application/json", **extra
    )
    assert resp.status_code == 401
    assert resp.json()["error"]
    assert resp["WWW-Authenticate"].startswith("Bearer")
    assert not Host.objects.exists()
    assert Event.objects.count() == 0


@pytest.mark.django_db
def test_connect_wrong_credentials_checked_before_body(client):
    """An unauthenticated request is refused with 401 even when its body is malformed."""
    resp = post(client, CONNECT, "{not json", "wrong-key")
    assert resp.status_code == 401


@pytest.mark.django_db
def test_connect_extension_fields_allowed(client, agent_key):
    """Extensions: unknown extra fields, top level and per VM, are accepted."""
    body = connect_body(x_vendor={"gpu": 2}, vms=[])
    body["agent_version"] = "1.2.3"
    resp = post(client, CONNECT, body, agent_key)
    assert resp.status_code == 200, resp.content


@pytest.mark.django_db
def test_connect_vms_optional(client, agent_key):
    """`vms` is optional on connect."""
    body = connect_body()
    del body["vms"]
    assert post(client, CONNECT, body, agent_key).status_code == 200


BAD_CONNECT = [
    # (id, body mutation, words the error must contain)
    ("missing-name", lambda b: b.pop("name"), ["missing", "name"]),
    (
        "missing-several",
        lambda b: [b.pop("cpus"), b.pop("agent_url")],
        ["missing", "cpus", "agent_url"],
    ),
    ("name-not-string", lambda b: b.update(name=17), ["name", "string"]),
    ("name-empty", lambda b: b.update(name=""), ["name", "empty"]),
    ("name-too-long", lambda b: b.update(name="h" * 256), ["name", "too long"]),
    ("name-nul", lambda b: b.update(name="kvm\x0001"), ["name", "control characters"]),
    ("cluster-newline", lambda b: b.update(cluster="c1\n"), ["cluster", "control characters"]),
    ("hypervisor-too-long", lambda b: b.update(hypervisor="K" * 33), ["hypervisor", "too long"]),
    ("type-unknown", lambda b: b.update(type="Hypervisor"), ["type", "Hypervisor"]),
    ("hypervisor-not-string", lambda b: b.update(hypervisor=None), ["hypervisor", "string"]),
    ("cluster-not-string", lambda b: b.update(cluster=["c1"]), ["cluster", "string"]),
    ("cpus-bool", lambda b: b.update(cpus=True), ["cpus", "integer"]),
    ("cpus-string", lambda b: b.update(cpus="32"), ["cpus", "integer"]),
    ("cpus-float", lambda b: b.update(cpus=32.5), ["cpus", "integer"]),
    ("cpus-zero", lambda b: b.update(cpus=0), ["cpus", "at least 1"]),
    ("memory-bool", lambda b: b.update(memory_mb=False), ["memory_mb", "integer"]),
    ("memory-negative", lambda b: b.update(memory_mb=-1), ["memory_mb", "at least 1"]),
    ("address-not-string", lambda b: b.update(address=10), ["address", "string"]),
    ("agent-url-scheme", lambda b: b.update(agent_url="ftp://x:21"), ["agent_url", "http"]),
    ("agent-url-no-host", lambda b: b.update(agent_url="http://"), ["agent_url", "host"]),
    ("agent-url-bad-port", lambda b: b.update(agent_url="http://h:99999"), ["agent_url"]),
    ("vms-not-list", lambda b: b.update(vms={"a": "PowerOn"}), ["vms", "array"]),
    (
        "vms-bad-state",
        lambda b: b.update(vms=[{"name": "a", "power_state": "Running"}]),
        ["vms[0]", "Running"],
    ),
]


@pytest.mark.django_db
@pytest.mark.parametrize(
    "mutate,words", [c[1:] for c in BAD_CONNECT], ids=[c[0] for c in BAD_CONNECT]
)
def test_connect_malformed_400_nothing_written(client, agent_key, host, mutate, words):
    """A malformed connect (new or known host) → 400 naming the problem; nothing changes."""
    for name in ("kvm-new", host.name):
        body = connect_body(name=name)
        mutate(body)
        before = db_state()
        resp = post(client, CONNECT, body, agent_key)
        assert resp.status_code == 400, resp.content
        message = resp.json()["error"]
        for word in words:
            assert word in message, (word, message)
        assert db_state() == before
    assert not Host.objects.filter(name="kvm-new").exists()


# --- ping -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_ping_refreshes_last_ping(client, agent_key):
    """R1: each ping refreshes last_ping and answers with the ping interval."""
    token = post(client, CONNECT, connect_body(), agent_key).json()["token"]
    Host.objects.filter(name="kvm-01").update(last_ping=EARLIER)
    resp = post(client, PING, {"vms": []}, token)
    assert resp.status_code == 200, resp.content
    assert resp.json() == {"ping_interval": 10}
    assert Host.objects.get(name="kvm-01").last_ping > EARLIER


@pytest.mark.django_db
def test_ping_interval_follows_configuration(client, host):
    """ping_interval comes from the `ping.interval` key in force (SPEC §2)."""
    config.set_value("ping.interval", "7")
    resp = post(
        client, PING, {"vms": [{"name": "i-2-10-VM", "power_state": "PowerOn"}]}, host.token
    )
    assert resp.status_code == 200
    assert resp.json() == {"ping_interval": 7}


@pytest.mark.django_db
def test_ping_report_updates_power_state(client, host):
    """R8: a ping's report updates the power state of the VMs it names; unknown names
    are ignored."""
    VMInstance.objects.filter(name="i-2-10-VM").update(power_state=PowerState.POWER_UNKNOWN)
    report = [
        {"name": "i-2-10-VM", "power_state": "PowerOn"},
        {"name": "not-a-known-vm", "power_state": "PowerOff"},
    ]
    resp = post(client, PING, {"vms": report}, host.token)
    assert resp.status_code == 200, resp.content
    vm = VMInstance.objects.get(name="i-2-10-VM")
    assert vm.power_state == PowerState.POWER_ON
    assert vm.power_host_id == host.pk
    assert not VMInstance.objects.filter(name="not-a-known-vm").exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "header",
    [None, "Bearer not-a-token", "Bearer {join}", "Token {token}"],
    ids=["missing", "wrong", "join-key", "wrong-scheme"],
)
def test_ping_bad_token_401_nothing_written(client, host, agent_key, header):
    """R1: only the host's own token refreshes last_ping; anything else is 401 and
    last_ping stays where it was."""
    extra = {}
    if header is not None:
        extra["HTTP_AUTHORIZATION"] = header.format(join=agent_key, token=host.token)
    before = db_state()
    resp = client.post(PING, data=json.dumps({"vms": []}), content_type="application/json", **extra)
    assert resp.status_code == 401
    assert resp.json()["error"]
    assert db_state() == before
    assert Host.objects.get(pk=host.pk).last_ping == EARLIER


def _vm(name="i-2-10-VM", state="PowerOn"):
    return {"name": name, "power_state": state}


BAD_PING = [
    # (id, raw body or JSON value, words the error must contain)
    ("bad-json", "{vms: [}", ["not valid JSON"]),
    ("truncated-json", '{"vms": [', ["not valid JSON"]),
    ("nan", '{"vms": NaN}', ["not valid JSON"]),
    ("empty-body", "", ["empty"]),
    ("array-body", [_vm()], ["JSON object", "array"]),
    ("string-body", json.dumps("ping"), ["JSON object", "string"]),
    ("null-body", "null", ["JSON object", "null"]),
    ("vms-missing", {}, ["missing", "vms"]),
    ("vms-not-list", {"vms": "i-2-10-VM"}, ["vms", "array"]),
    ("vms-object", {"vms": {"i-2-10-VM": "PowerOn"}}, ["vms", "array"]),
    ("vms-null", {"vms": None}, ["vms", "array"]),
    ("entry-not-object", {"vms": [_vm(), "i-2-11-VM"]}, ["vms[1]", "object"]),
    ("unknown-power-state", {"vms": [_vm(), _vm("b", "Running")]}, ["vms[1]", "'Running'"]),
    ("power-unknown", {"vms": [_vm("b", "PowerUnknown")]}, ["vms[0]", "PowerUnknown"]),
    ("power-lowercase", {"vms": [_vm("b", "poweron")]}, ["vms[0]", "poweron"]),
    ("power-null", {"vms": [{"name": "b", "power_state": None}]}, ["vms[0]", "null"]),
    ("missing-name", {"vms": [{"power_state": "PowerOn"}]}, ["vms[0]", "name"]),
    ("missing-power", {"vms": [{"name": "b"}]}, ["vms[0]", "power_state"]),
    ("name-not-string", {"vms": [_vm(10)]}, ["vms[0].name", "string"]),
    ("name-empty", {"vms": [_vm("")]}, ["vms[0].name", "empty"]),
    ("name-too-long", {"vms": [_vm("v" * 256)]}, ["vms[0].name", "too long"]),
    ("name-nul", {"vms": [_vm("i-2-10\x00-VM")]}, ["vms[0].name", "control characters"]),
    ("deeply-nested", '{"vms": ' + "[" * 100_000 + "]" * 100_000 + "}", ["nested too deeply"]),
    (
        "duplicate",
        {"vms": [_vm("a"), _vm("i-2-10-VM"), _vm("i-2-10-VM", "PowerOff")]},
        ["duplicate", "i-2-10-VM", "vms[2]", "vms[1]"],
    ),
    (
        "too-many",
        {"vms": [_vm(f"vm-{i}") for i in range(validation.MAX_VMS + 1)]},
        ["too large", "10000"],
    ),
]


@pytest.mark.django_db
@pytest.mark.parametrize("body,words", [c[1:] for c in BAD_PING], ids=[c[0] for c in BAD_PING])
def test_ping_malformed_400_nothing_written(client, host, body, words):
    """A malformed ping → 400 with an error naming the problem; last_ping, VM rows,
    events and HA work are unchanged (a rejected request changes nothing)."""
    before = db_state()
    resp = post(client, PING, body, host.token)
    assert resp.status_code == 400, resp.content
    message = resp.json()["error"]
    for word in words:
        assert word in message, (word, message)
    assert db_state() == before


@pytest.mark.django_db
def test_ping_oversized_body_refused(client, host):
    """A body over 4 MiB is refused as "report too large" without being parsed."""
    padding = "x" * (validation.MAX_BODY_BYTES + 1)
    before = db_state()
    resp = post(client, PING, json.dumps({"vms": [], "padding": padding}), host.token)
    assert resp.status_code in (400, 413)
    assert "too large" in resp.json()["error"]
    assert db_state() == before


@pytest.mark.django_db
def test_ping_large_report_within_limit_accepted(client, host):
    """10,000 VMs with long names (about 3 MB, above Django's own 2.5 MB default) is a
    valid report."""
    vms = [_vm(f"{i:06d}-" + "v" * 240, "PowerOff") for i in range(validation.MAX_VMS)]
    body = json.dumps({"vms": vms})
    assert 2_621_440 < len(body) <= validation.MAX_BODY_BYTES
    resp = post(client, PING, body, host.token)
    assert resp.status_code == 200, resp.content[:300]


@pytest.mark.django_db
def test_ping_wrong_content_type_415(client, host):
    """Bodies are application/json; a form post is refused and changes nothing."""
    before = db_state()
    resp = client.post(PING, data={"vms": "x"}, HTTP_AUTHORIZATION=f"Bearer {host.token}")
    assert resp.status_code == 415
    assert "application/json" in resp.json()["error"]
    assert db_state() == before


@pytest.mark.django_db
@pytest.mark.parametrize("path", [CONNECT, PING, DISCONNECT])
def test_only_post_allowed(client, host, path):
    """The agent endpoints accept POST only: 405 with a JSON error and an Allow header."""
    resp = client.get(path, HTTP_AUTHORIZATION=f"Bearer {host.token}")
    assert resp.status_code == 405
    assert resp["Allow"] == "POST"
    assert "POST" in resp.json()["error"]


# --- disconnect -----------------------------------------------------------------------


@pytest.mark.django_db
def test_disconnect_goes_disconnected_without_investigation(client, host):
    """R7: an agent's goodbye is ShutdownRequested → Disconnected, with no
    investigation and no HA for its VMs."""
    resp = post(client, DISCONNECT, {"reason": "shutdown"}, host.token)
    assert resp.status_code == 200, resp.content
    assert resp.json() == {}
    host.refresh_from_db()
    assert host.status == HostStatus.DISCONNECTED
    assert host.next_investigation is None
    assert HaWork.objects.count() == 0
    vm = VMInstance.objects.get(name="i-2-10-VM")
    assert vm.state == VmState.RUNNING and vm.host_id == host.pk
    assert Event.objects.filter(host=host, new=HostStatus.DISCONNECTED).exists()


@pytest.mark.django_db
@pytest.mark.parametrize("body", ["", {}, {"reason": None}], ids=["no-body", "empty", "null"])
def test_disconnect_reason_optional(client, host, body):
    """R7: `reason` is optional (an empty body is accepted too)."""
    resp = post(client, DISCONNECT, body, host.token)
    assert resp.status_code == 200, resp.content
    host.refresh_from_db()
    assert host.status == HostStatus.DISCONNECTED


@pytest.mark.django_db
@pytest.mark.parametrize(
    "body,status",
    [({"reason": 5}, 400), ("[1]", 400), ("{bad", 400)],
    ids=["reason-not-string", "array-body", "bad-json"],
)
def test_disconnect_malformed_400_nothing_written(client, host, body, status):
    """R7 only on a well-formed goodbye: a malformed one is 400 and the host stays Up."""
    before = db_state()
    resp = post(client, DISCONNECT, body, host.token)
    assert resp.status_code == status
    assert resp.json()["error"]
    assert db_state() == before


@pytest.mark.django_db
def test_disconnect_bad_token_401_nothing_written(client, host, agent_key):
    """R7 needs the host's own token: the join key or a wrong token is 401."""
    before = db_state()
    for token in ("nope", agent_key):
        resp = post(client, DISCONNECT, {"reason": "shutdown"}, token)
        assert resp.status_code == 401
    assert db_state() == before


# --- validation and auth units --------------------------------------------------------


def test_parse_vms_returns_name_state_pairs():
    report = [
        {"name": "a", "power_state": "PowerOn", "extra": 1},
        {"name": "b", "power_state": "PowerOff"},
    ]
    assert validation.parse_vms(report) == [("a", "PowerOn"), ("b", "PowerOff")]


def test_parse_connect_returns_connect_data():
    data = validation.parse_connect(
        connect_body(vms=[{"name": "a", "power_state": "PowerOn"}], extra="ok")
    )
    assert data.name == "kvm-01" and data.type == "Routing" and data.hypervisor == "KVM"
    assert data.cpus == 32 and data.memory_mb == 131072
    assert data.vms == [("a", "PowerOn")]


def test_parse_json_object_size_limit():
    with pytest.raises(ProtocolError) as exc:
        validation.parse_json_object(b" " * (validation.MAX_BODY_BYTES + 1))
    assert "too large" in exc.value.message


@pytest.mark.django_db
def test_disconnect_reason_with_control_characters(client, host):
    """R7: a goodbye reason is free text; control characters (NUL, which PostgreSQL
    cannot store) are blanked rather than refused."""
    resp = post(client, DISCONNECT, {"reason": "bye\x00now\n" + "r" * 400}, host.token)
    assert resp.status_code == 200, resp.content
    host.refresh_from_db()
    assert host.status == HostStatus.DISCONNECTED


def test_disconnect_reason_truncated_to_column():
    assert validation.parse_disconnect({"reason": "r" * 1000}) == "r" * 255


@pytest.mark.parametrize(
    "headers,expected",
    [
        ({"Authorization": "Bearer abc"}, "abc"),
        ({"Authorization": "bearer   abc  "}, "abc"),
        ({"authorization": "Bearer abc"}, "abc"),
        ({"Authorization": "Basic abc"}, None),
        ({"Authorization": "Bearer "}, None),
        ({}, None),
        ([(b"host", b"x"), (b"authorization", b"Bearer t0k")], "t0k"),
        ([(b"host", b"x")], None),
    ],
)
def test_bearer(headers, expected):
    assert bearer(headers) == expected


def test_is_join_key(agent_key, settings):
    assert is_join_key(agent_key)
    assert not is_join_key(agent_key + "x")
    assert not is_join_key(None)
    settings.HADASH_AGENT_KEY = ""
    assert not is_join_key("")
