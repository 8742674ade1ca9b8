"""The agent protocol's HTTP requests under ASGI run their database work in
hosts.agent.dbpool's threads, on connections kept between requests (issue 12: a fleet
connecting at once paid a new PostgreSQL connection per request). Through the real
ASGI application (AgentGate, Django's ASGI handler, the async views); R29/R30 answers
are the same as through the test client."""

from __future__ import annotations

import json
import threading
import time

import pytest
from asgiref.sync import async_to_sync
from channels.testing import HttpCommunicator
from django.conf import settings
from django.db import connection

from hadash.models import Event
from hosts.agent import dbpool
from hosts.models import Host

BODY = {"name": "kvm-01", "type": "Routing", "hypervisor": "KVM", "cluster": "c1",
        "cpus": 8, "memory_mb": 16384, "address": "10.0.0.11",
        "agent_url": "http://10.0.0.11:8250/",
        "vms": [{"name": "vm-1", "power_state": "PowerOn"}]}


@pytest.fixture(autouse=True)
def _close_pool_connections():
    yield
    dbpool.close_all()  # before the test database is flushed or dropped


def post(path: str, body, credential: str | None, *, full: bool = False):
    from hadash.asgi import application

    headers = [(b"host", b"testserver"), (b"content-type", b"application/json")]
    if credential is not None:
        headers.append((b"authorization", f"Bearer {credential}".encode()))
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers.append((b"content-length", str(len(raw)).encode()))

    async def go():
        return await HttpCommunicator(application, "POST", path, body=raw,
                                      headers=headers).get_response(timeout=20)

    r = async_to_sync(go)()
    if full:
        return r
    return r["status"], json.loads(r["body"] or b"{}")


def pool_backends() -> set:
    """The backend (PostgreSQL pid, or the thread) of each pool thread's connection."""
    def which():
        time.sleep(0.02)  # every thread takes some
        if connection.vendor == "postgresql":
            with connection.cursor() as cur:
                cur.execute("SELECT pg_backend_pid()")
                return cur.fetchone()[0]
        return id(connection.connection)

    async def go():
        import asyncio

        return await asyncio.gather(*(dbpool.run(which) for _ in range(4 * dbpool.THREADS)))

    return set(async_to_sync(go)())


@pytest.mark.postgres_only  # what it counts are server connections; SQLite's are files
@pytest.mark.django_db(transaction=True)
def test_connects_under_asgi_reuse_the_pools_connections(monkeypatch):
    """R29 enrolment and R6 reconnects through the ASGI application: answered as the
    protocol says, and served by at most THREADS long-lived connections."""
    calls = []
    real = dbpool.run

    async def counted(fn, *args, **kwargs):
        calls.append(fn.__name__)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(dbpool, "run", counted)
    status, enrolled = post("/api/agent/v1/connect", BODY, settings.HADASH_AGENT_KEY)
    assert status == 200, enrolled
    token = enrolled["token"]
    before = pool_backends()
    for _ in range(5):
        status, again = post("/api/agent/v1/connect", BODY, token)
        assert status == 200 and again["token"] == token  # R29: echoed, not rotated
        assert again["server_token"] == enrolled["server_token"]
    assert len(before) <= dbpool.THREADS
    # AgentGate's token lookup, then the connect itself: both in the pool.
    assert calls == ["_enrol"] + ["which"] * 16 + ["_lookup", "_reconnect"] * 5
    assert pool_backends() == before  # no new connection for those requests
    host = Host.objects.get(name="kvm-01")
    assert host.status == "Up" and host.update_count == 1 + 5 * 2 + 1
    # Each connect: AgentConnected (Up → Connecting) then Ready, in that order.
    events = list(Event.objects.filter(subject="host").order_by("id")
                  .values_list("event", "old", "new"))
    assert events[:2] == [("AgentConnected", "Creating", "Connecting"),
                          ("Ready", "Connecting", "Up")]
    assert events[2:] == [("AgentConnected", "Up", "Connecting"),
                          ("Ready", "Connecting", "Up")] * 5


@pytest.mark.postgres_only  # what it counts are server connections; SQLite's are files
@pytest.mark.django_db(transaction=True)
def test_refusals_under_asgi_change_nothing_and_keep_the_connections():
    """R29/R31 under ASGI: a known name with the join key → 409, a bad body → 400,
    a wrong token → 401 (AgentGate); nothing written, the pool's connections stay."""
    status, enrolled = post("/api/agent/v1/connect", BODY, settings.HADASH_AGENT_KEY)
    assert status == 200
    before = pool_backends()
    n_events = Event.objects.count()
    status, answer = post("/api/agent/v1/connect", BODY, settings.HADASH_AGENT_KEY)
    assert status == 409 and "already enrolled" in answer["error"]
    status, answer = post("/api/agent/v1/connect", dict(BODY, cpus="many"),
                          enrolled["token"])
    assert status == 400 and "cpus" in answer["error"]
    status, answer = post("/api/agent/v1/connect", BODY, "not-a-token")
    assert status == 401
    status, answer = post("/api/agent/v1/ping", b"{not json", enrolled["token"])
    assert status == 400
    assert Event.objects.count() == n_events
    assert pool_backends() == before


@pytest.mark.django_db(transaction=True)
def test_a_connection_lost_between_requests_costs_no_request_an_error(monkeypatch):
    """PostgreSQL ends the pool's backends (a restart, a failover) while no request
    runs: the next requests check their idle connection first and reconnect."""
    if connection.vendor != "postgresql":
        pytest.skip("terminates PostgreSQL backends")
    monkeypatch.setattr(dbpool, "CHECK_AFTER", 0.2)
    status, enrolled = post("/api/agent/v1/connect", BODY, settings.HADASH_AGENT_KEY)
    assert status == 200
    old = pool_backends()
    with connection.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid",
                    [sorted(old)])
    time.sleep(0.5)
    for _ in range(2 * dbpool.THREADS):
        status, answer = post("/api/agent/v1/connect", BODY, enrolled["token"])
        assert status == 200, answer
    assert not pool_backends() & old


@pytest.mark.django_db(transaction=True)
def test_agent_answers_under_asgi_carry_the_same_headers(client):
    """AgentGate hands agent requests to a handler with only the middleware that sets
    headers (hosts.agent.asgi.agent_handler): an answer carries the same headers as
    through Django's full middleware (the test client)."""
    status, enrolled = post("/api/agent/v1/connect", BODY, settings.HADASH_AGENT_KEY)
    assert status == 200
    r = post("/api/agent/v1/connect", BODY, settings.HADASH_AGENT_KEY, full=True)
    assert r["status"] == 409
    asgi = {k.decode().lower(): v.decode() for k, v in r["headers"]}
    full = client.post("/api/agent/v1/connect", data=json.dumps(BODY),
                       content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {settings.HADASH_AGENT_KEY}")
    assert full.status_code == 409
    expected = {k.lower(): v for k, v in full.headers.items()}
    for name in ("x-content-type-options", "referrer-policy", "cross-origin-opener-policy",
                 "x-frame-options", "content-security-policy", "content-type"):
        assert asgi.get(name) == expected.get(name), name
    assert set(asgi) == set(expected)



@pytest.mark.postgres_only  # like the two above: SQLite's pool threads reopen theirs
@pytest.mark.django_db(transaction=True)
def test_websocket_upgrades_check_their_token_on_the_pools_connections(monkeypatch):
    """Issue 12: each agent socket's token check ran in Channels' shared sync thread on
    a new database connection (on PostgreSQL a fork per socket, queued behind every
    other sync call). Now five sockets open and ping without opening one, and a wrong
    token is still refused at the upgrade."""
    from channels.testing import WebsocketCommunicator
    from django.db import connections

    from hadash.asgi import application

    status, enrolled = post("/api/agent/v1/connect", BODY, settings.HADASH_AGENT_KEY)
    assert status == 200, enrolled
    pool_backends()  # every pool thread has its connection

    async def sockets(token: str, n: int) -> list:
        answers = []
        for _ in range(n):
            comm = WebsocketCommunicator(application, "/api/agent/v1/ws", headers=[
                (b"host", b"testserver"), (b"authorization", f"Bearer {token}".encode())])
            connected, _ = await comm.connect(timeout=10)
            if connected:
                await comm.send_json_to({"type": "ping", "vms": BODY["vms"]})
                answers.append((await comm.receive_json_from(timeout=10))["type"])
                await comm.disconnect()
            else:
                answers.append("refused")
        return answers

    opened = []
    wrapper = type(connections["default"])
    real = wrapper.get_new_connection

    def counting(self, params):
        # The ping batcher's threads (hadash-ingest) open theirs once, for pings.
        if not threading.current_thread().name.startswith("hadash-ingest"):
            opened.append(threading.current_thread().name)
        return real(self, params)

    monkeypatch.setattr(wrapper, "get_new_connection", counting)
    assert async_to_sync(sockets)(enrolled["token"], 5) == ["pong"] * 5
    assert async_to_sync(sockets)("wrong-token", 1) == ["refused"]
    assert opened == []
