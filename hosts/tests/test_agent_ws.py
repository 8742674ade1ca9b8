"""Websocket transport for pings (PROTOCOL.md): /api/agent/v1/ws means exactly
`POST /ping` — same authentication, same validation, same effect (R1, R8) — and a
closed socket is not a disconnect (R7 needs an explicit goodbye)."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator

from hadash import config
from hadash.asgi import application
from hadash.models import Event, HaWork
from hosts.choices import HostStatus
from hosts.models import Host
from vms.choices import PowerState, VmState
from vms.models import VMInstance

WS = "/api/agent/v1/ws"
EARLIER = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
TIMEOUT = 5

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def host():
    """An Up host with a Running VM; ``host.token`` is its agent token."""
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
        power_state=PowerState.POWER_UNKNOWN,
        power_host=h,
        power_state_update_time=EARLIER,
        ha_enabled=True,
    )
    h.token = token
    return h


def db_state() -> dict:
    return {
        "hosts": list(Host.objects.order_by("pk").values()),
        "vms": list(VMInstance.objects.order_by("pk").values()),
        "events": Event.objects.count(),
        "ha_work": HaWork.objects.count(),
    }


def communicator(token: str | None) -> WebsocketCommunicator:
    headers = [(b"host", b"testserver")]
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    return WebsocketCommunicator(application, WS, headers=headers)


def exchange(token: str | None, messages: list, *, close: bool = True) -> dict:
    """Open a socket, send each message (a dict is sent as JSON text, bytes as a binary
    frame, str as it is), collect one answer per message. Returns what happened."""

    async def run():
        comm = communicator(token)
        connected, code = await comm.connect(timeout=TIMEOUT)
        result = {"connected": connected, "code": code, "answers": [], "closed": None}
        if not connected:
            return result
        for message in messages:
            if isinstance(message, bytes):
                await comm.send_to(bytes_data=message)
            elif isinstance(message, str):
                await comm.send_to(text_data=message)
            else:
                await comm.send_json_to(message)
            output = await comm.receive_output(timeout=TIMEOUT)
            if output["type"] == "websocket.close":
                result["closed"] = output.get("code")
                break
            result["answers"].append(json.loads(output["text"]))
        if result["closed"] is None and result["answers"] and messages:
            # A token rejected mid-connection answers with an error, then closes.
            if not await comm.receive_nothing(timeout=0.1):
                output = await comm.receive_output(timeout=TIMEOUT)
                result["closed"] = output.get("code")
        if close and result["closed"] is None:
            await comm.disconnect()
        return result

    return async_to_sync(run)()


def ping(vms=()):
    return {"type": "ping", "vms": [{"name": n, "power_state": s} for n, s in vms]}


def test_ping_over_websocket_refreshes_last_ping(host):
    """R1 over the websocket: a ping refreshes last_ping; answered with a pong."""
    result = exchange(host.token, [ping([("i-2-10-VM", "PowerOn")])])
    assert result["connected"]
    assert result["answers"] == [{"type": "pong", "ping_interval": 10}]
    host.refresh_from_db()
    assert host.last_ping > EARLIER


def test_ping_over_websocket_applies_report(host):
    """R8 over the websocket: the report updates the named VMs' power state."""
    exchange(host.token, [ping([("i-2-10-VM", "PowerOn"), ("unknown-vm", "PowerOff")])])
    vm = VMInstance.objects.get(name="i-2-10-VM")
    assert vm.power_state == PowerState.POWER_ON
    assert vm.power_host_id == host.pk


def test_pong_carries_configured_interval(host):
    """The pong's ping_interval is `ping.interval` in force."""
    config.set_value("ping.interval", "4")
    result = exchange(host.token, [ping([("i-2-10-VM", "PowerOn")])])
    assert result["answers"] == [{"type": "pong", "ping_interval": 4}]


def test_many_pings_on_one_socket(host):
    """One socket carries ping after ping."""
    result = exchange(host.token, [ping([("i-2-10-VM", "PowerOn")])] * 3)
    assert [a["type"] for a in result["answers"]] == ["pong"] * 3


def test_a_repeated_message_is_taken_like_the_first(host):
    """A socket reuses the validated report of an unchanged message (issue 12): the
    same text again is a ping like the first (last_ping moves on), a malformed message
    in between is still answered with an error and changes nothing, and a changed
    report is parsed and applied afresh."""
    same = json.dumps(ping([("i-2-10-VM", "PowerOn")]))
    before = {}

    async def run():
        comm = communicator(host.token)
        assert (await comm.connect(timeout=TIMEOUT))[0]
        answers = []

        async def send(text):
            await comm.send_to(text_data=text)
            answers.append(json.loads((await comm.receive_output(timeout=TIMEOUT))["text"]))

        await send(same)
        before["last_ping"] = await Host.objects.values_list("last_ping", flat=True) \
            .aget(pk=host.pk)
        await send(same)
        after_repeat = await Host.objects.values_list("last_ping", flat=True).aget(pk=host.pk)
        state = await sync_to_async(db_state)()
        await send('{"type": "ping", "vms": [{"name": "i-2-10-VM"}]}')
        assert await sync_to_async(db_state)() == state  # the error changed nothing
        await send(json.dumps(ping([("i-2-10-VM", "PowerOff")])))
        await comm.disconnect()
        return answers, after_repeat

    answers, after_repeat = async_to_sync(run)()
    assert [a["type"] for a in answers] == ["pong", "pong", "error", "pong"]
    assert "power_state" in answers[2]["error"]
    assert after_repeat > before["last_ping"]
    vm = VMInstance.objects.get(name="i-2-10-VM")
    assert vm.power_state == PowerState.POWER_OFF  # the changed report was applied


@pytest.mark.parametrize(
    "token", [None, "not-a-token", "join"], ids=["missing", "wrong", "join-key"]
)
def test_wrong_token_refuses_upgrade(host, agent_key, token):
    """A missing or wrong token (the join key included) refuses the upgrade and
    changes nothing."""
    before = db_state()
    result = exchange(agent_key if token == "join" else token, [ping()])
    assert not result["connected"]
    assert db_state() == before


BAD_MESSAGES = [
    ("bad-json", "{type: ping", "not valid JSON"),
    ("not-object", json.dumps([1, 2]), "JSON object"),
    ("no-type", {"vms": []}, "type"),
    ("wrong-type", {"type": "hello", "vms": []}, "hello"),
    ("vms-missing", {"type": "ping"}, "vms"),
    ("vms-not-list", {"type": "ping", "vms": "x"}, "array"),
    (
        "unknown-state",
        {"type": "ping", "vms": [{"name": "i-2-10-VM", "power_state": "Running"}]},
        "Running",
    ),
    (
        "duplicate",
        {"type": "ping", "vms": [{"name": "a", "power_state": "PowerOn"}] * 2},
        "duplicate",
    ),
    ("binary", b'{"type": "ping", "vms": []}', "text"),
]


@pytest.mark.parametrize(
    "message,word", [c[1:] for c in BAD_MESSAGES], ids=[c[0] for c in BAD_MESSAGES]
)
def test_malformed_message_answers_error_and_changes_nothing(host, message, word):
    """A malformed message is answered with an error, changes nothing (no last_ping
    refresh, no power state), and the socket stays usable."""
    before = db_state()
    result = exchange(host.token, [message])
    assert result["connected"] and result["closed"] is None
    [answer] = result["answers"]
    assert answer["type"] == "error"
    assert word in answer["error"]
    assert db_state() == before
    # The same socket then takes a good ping.
    result = exchange(host.token, [message, ping([("i-2-10-VM", "PowerOn")])])
    assert [a["type"] for a in result["answers"]] == ["error", "pong"]


def test_closing_is_not_a_disconnect(host):
    """R7 needs an explicit goodbye: a socket that closes leaves the host Up and writes
    nothing."""
    exchange(host.token, [])
    result = exchange(host.token, [ping([("i-2-10-VM", "PowerOn")])])
    assert result["answers"][0]["type"] == "pong"
    after_ping = db_state()
    exchange(host.token, [])  # connect and close again
    host.refresh_from_db()
    assert host.status == HostStatus.UP
    assert db_state() == after_ping


def test_rotated_token_closes_socket(host, client, agent_key):
    """R29: a re-enrolment (an operator allowed it, a join-key connect took it) issues
    a fresh token; a socket opened with the old one gets an error and is closed on its
    next ping, changing nothing."""

    async def run():
        comm = communicator(host.token)
        connected, _ = await comm.connect(timeout=TIMEOUT)
        assert connected
        from channels.db import database_sync_to_async

        @database_sync_to_async
        def reconnect():
            from django.utils import timezone

            host.allow_reenrol(now=timezone.now(), by="test")
            body = {
                "name": host.name,
                "type": "Routing",
                "hypervisor": "KVM",
                "cluster": "c1",
                "cpus": 32,
                "memory_mb": 131072,
                "address": "10.0.0.11",
                "agent_url": "http://10.0.0.11:8250",
            }
            resp = client.post(
                "/api/agent/v1/connect",
                data=json.dumps(body),
                content_type="application/json",
                HTTP_AUTHORIZATION=f"Bearer {agent_key}",
            )
            assert resp.status_code == 200
            Host.objects.filter(pk=host.pk).update(last_ping=EARLIER)
            return resp.json()["token"]

        new_token = await reconnect()
        assert new_token != host.token
        await comm.send_json_to(ping())
        answer = await comm.receive_json_from(timeout=TIMEOUT)
        closed = await comm.receive_output(timeout=TIMEOUT)
        return answer, closed

    answer, closed = async_to_sync(run)()
    assert answer["type"] == "error" and "token" in answer["error"]
    assert closed["type"] == "websocket.close" and closed["code"] == 4401
    host.refresh_from_db()
    assert host.last_ping == EARLIER


def test_ping_is_stamped_with_its_arrival_time(host, monkeypatch):
    """R1/R2 (docs/benchmarks.md P5): last_ping is the time the message came in (taken
    by the consumer before the ping waits for its batch), on the full path (first
    ping: the VM's power state changes) and on the steady path (second ping)."""
    from types import SimpleNamespace

    from django.utils import timezone

    from hosts.agent import consumers

    first, second = timezone.now() - dt.timedelta(seconds=30), timezone.now() - dt.timedelta(
        seconds=20)
    times = iter([first, second])
    monkeypatch.setattr(consumers, "timezone", SimpleNamespace(now=lambda: next(times)))
    result = exchange(host.token, [ping([("i-2-10-VM", "PowerOn")])] * 2)
    assert [a["type"] for a in result["answers"]] == ["pong", "pong"]
    host.refresh_from_db()
    assert host.last_ping == second
    vm = VMInstance.objects.get(name="i-2-10-VM")
    assert (vm.power_state, vm.power_state_update_time, vm.power_state_update_count) == (
        PowerState.POWER_ON, second, 2)


def test_agent_socket_has_no_channel_layer(host):
    """P4: an agent socket subscribes to no channel layer (nothing is sent to agents
    through one); the dashboard's live events consumer still uses the default one."""
    from channels.layers import get_channel_layer

    from hadash.consumers import EventsConsumer
    from hosts.agent.consumers import AgentPingConsumer

    seen = {}

    class Probe(AgentPingConsumer):
        async def connect(self):
            seen["layer"] = self.channel_layer
            seen["channel"] = getattr(self, "channel_name", None)
            await super().connect()

    async def run():
        headers = [(b"host", b"testserver"),
                   (b"authorization", f"Bearer {host.token}".encode())]
        comm = WebsocketCommunicator(Probe.as_asgi(), WS, headers=headers)
        connected, _ = await comm.connect(timeout=TIMEOUT)
        await comm.send_json_to(ping([("i-2-10-VM", "PowerOn")]))
        answer = await comm.receive_json_from(timeout=TIMEOUT)
        await comm.disconnect()
        return connected, answer

    connected, answer = async_to_sync(run)()
    assert connected and answer["type"] == "pong"
    assert seen == {"layer": None, "channel": None}
    assert get_channel_layer(EventsConsumer.channel_layer_alias) is not None


def test_agent_sockets_never_use_channels_shared_sync_thread(host, monkeypatch):
    """P2 and issue 12: no message of an agent socket hops into Channels' one shared
    sync thread (its per-message connection clean-up, or database_sync_to_async): the
    upgrade's token check runs in hosts.agent.dbpool's threads, once per socket, and
    pings in the batcher's. A fleet connecting at once no longer queues its token
    checks behind every other sync call of the web process."""
    import channels.consumer
    import channels.db

    from hosts.agent import dbpool

    hops, pool_calls = [], []
    real_run = dbpool.run

    async def counting_hop(*args, **kwargs):
        hops.append(1)

    async def counting_run(fn, *args, **kwargs):
        pool_calls.append(fn.__name__)
        return await real_run(fn, *args, **kwargs)

    monkeypatch.setattr(channels.db, "aclose_old_connections", counting_hop)
    monkeypatch.setattr(channels.consumer, "aclose_old_connections", counting_hop,
                        raising=False)
    monkeypatch.setattr(dbpool, "run", counting_run)
    try:
        result = exchange(host.token, [ping([("i-2-10-VM", "PowerOn")])] * 3)
        refused = exchange("not-a-token", [ping()])
    finally:
        dbpool.close_all()  # before the test database is flushed
    assert [a["type"] for a in result["answers"]] == ["pong"] * 3
    assert refused["connected"] is False
    assert hops == []
    assert pool_calls == ["_authenticate", "_authenticate"]  # one per socket
