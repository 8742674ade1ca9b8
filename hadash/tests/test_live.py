"""Live events (hadash.live, hadash.consumers): every committed event reaches a
connected dashboard within a second, from any process; reconnecting with the last
watermark misses nothing; only logged-in users from allowed origins get in."""

import asyncio
import subprocess
import sys
import threading
import time

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.test import Client

from hadash import config
from hadash.asgi import application
from hadash.choices import Subject
from hadash.events import record_event
from hadash.settings import redis_channel_layer
from hadash.supervisor import ROOT

pytestmark = pytest.mark.django_db(transaction=True)


def session_headers(origin="http://localhost"):
    user = get_user_model().objects.create_user("op", password="pw-123456")
    c = Client()
    c.force_login(user)
    return [(b"origin", origin.encode()),
            (b"cookie", f"sessionid={c.cookies['sessionid'].value}".encode())]


def run_async(fn):
    """Run an async test body, then stop the relay it started, so no LISTEN
    connection outlives the test (the test database must drop cleanly)."""
    from hadash import live

    async def wrapped():
        try:
            await fn()
        finally:
            await live.stop_relay()
    async_to_sync(wrapped)()


async def connect(path, headers):
    comm = WebsocketCommunicator(application, path, headers=headers)
    ok, _ = await comm.connect(timeout=5)
    return comm, ok


async def collect(comm, want, timeout=3.0):
    """Receive batches until ``want`` event ids arrived; returns (events, watermark)."""
    got, mark = {}, None
    deadline = time.monotonic() + timeout
    while not want <= set(got):
        if time.monotonic() >= deadline:
            break
        # receive_nothing waits without cancelling the app on timeout (receive_* would).
        if await comm.receive_nothing(timeout=0.05, interval=0.01):
            continue
        msg = await comm.receive_json_from(timeout=1)
        assert msg["type"] == "events", msg
        for e in msg["events"]:
            got[e["id"]] = e
        mark = msg["watermark"]
    return got, mark


def write_event(message):
    """An event committed by another thread (its own connection), as the engine does."""
    out = {}

    def run():
        try:
            with transaction.atomic():
                out["id"] = record_event(Subject.ENGINE, None, name="test", event="Test",
                                         message=message).id
        finally:
            connection.close()

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out["id"]


def test_anonymous_and_foreign_origin_are_refused():
    foreign = session_headers("http://evil.example")

    async def run():
        comm, ok = await connect("/ws/events", [(b"origin", b"http://localhost")])
        assert not ok
        comm, ok = await connect("/ws/events", foreign)
        assert not ok
    run_async(run)


def test_committed_events_arrive_within_a_second():
    headers = session_headers()

    async def run():
        comm, ok = await connect("/ws/events", headers)
        assert ok
        first = await comm.receive_json_from(timeout=3)
        assert first["type"] == "events" and first["events"] == []
        t0 = time.monotonic()
        ids = {await asyncio.to_thread(write_event, f"e{i}") for i in range(3)}
        got, mark = await collect(comm, ids, timeout=3)
        assert ids <= set(got), "events did not arrive"
        assert time.monotonic() - t0 < 1.5
        assert mark >= max(ids)
        await comm.disconnect()
    run_async(run)


def test_reconnect_with_watermark_misses_nothing():
    headers = session_headers()

    async def run():
        comm, ok = await connect("/ws/events", headers)
        mark = (await comm.receive_json_from(timeout=3))["watermark"]
        await comm.disconnect()
        missed = {await asyncio.to_thread(write_event, f"while away {i}") for i in range(5)}
        comm, ok = await connect(f"/ws/events?after={mark}", headers)
        assert ok
        got, _ = await collect(comm, missed, timeout=3)
        assert missed <= set(got)
        assert min(got) > mark
        await comm.disconnect()
    run_async(run)


def test_events_from_another_process_arrive():
    """The relay reads committed rows (LISTEN/NOTIFY on PostgreSQL, polling on
    SQLite): an event written by a separate process reaches the socket."""
    headers = session_headers()
    env_db = connection.settings_dict

    async def run():
        comm, ok = await connect("/ws/events", headers)
        await comm.receive_json_from(timeout=3)
        import os

        env = dict(os.environ)
        if connection.vendor == "postgresql":
            env["DATABASE_URL"] = (f"postgres://{env_db['USER'] or 'postgres'}@"
                                   f"{env_db['HOST'] or '127.0.0.1'}:{env_db['PORT'] or 5432}/"
                                   f"{env_db['NAME']}")
        else:
            env["DATABASE_URL"] = f"sqlite:///{env_db['NAME']}"
        code = ("from hadash import config; config.set_value('ha.workers', 9, by='other')")
        await asyncio.to_thread(subprocess.run, [sys.executable, str(ROOT / "manage.py"),
                                                 "shell", "-c", code],
                                env=env, check=True, timeout=60)
        deadline = time.monotonic() + 3
        seen = []
        while time.monotonic() < deadline:
            got, _ = await collect(comm, {-1}, timeout=0.5)
            seen += list(got.values())
            if any(e["event"] == "ConfigChanged" and e["new"] == "9" for e in seen):
                break
        assert any(e["event"] == "ConfigChanged" and e["new"] == "9" for e in seen)
        await comm.disconnect()
    run_async(run)
    assert config.get("ha.workers") == 9


@pytest.mark.postgres_only
def test_an_event_committed_late_with_a_lower_id_is_still_delivered():
    """Sequence ids commit out of order: id N+1 may be visible before id N. The relay
    re-reads the hole and holds the watermark below it until it arrives."""
    headers = session_headers()
    slow_started, release = threading.Event(), threading.Event()
    out = {}

    def slow_writer():
        try:
            with transaction.atomic():
                out["id"] = record_event(Subject.ENGINE, None, name="t", event="Slow").id
                slow_started.set()
                release.wait(5)
        finally:
            connection.close()

    async def run():
        comm, ok = await connect("/ws/events", headers)
        await comm.receive_json_from(timeout=3)
        t = threading.Thread(target=slow_writer)
        t.start()
        await asyncio.to_thread(slow_started.wait, 5)
        fast = await asyncio.to_thread(write_event, "fast")
        got, mark = await collect(comm, {fast}, timeout=3)
        assert fast in got and out["id"] < fast
        assert mark < out["id"], "watermark must stay below the uncommitted event"
        release.set()
        await asyncio.to_thread(t.join)
        got, mark = await collect(comm, {out["id"]}, timeout=3)
        assert out["id"] in got
        assert mark >= fast
        await comm.disconnect()
    run_async(run)


def redis_url():
    import os
    import socket

    url = os.environ.get("HADASH_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    host_port = url.split("//", 1)[1].split("/", 1)[0]
    host, _, port = host_port.partition(":")
    try:
        socket.create_connection((host, int(port or 6379)), timeout=1).close()
    except OSError:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"Redis is not reachable at {url} (required when CI=true)")
        pytest.skip(f"Redis is not reachable at {url}")
    return url


def test_events_arrive_through_the_redis_channel_layer(settings):
    """Production with several web processes sets REDIS_URL (channels_redis): the
    relay's group messages go through Redis and still reach the socket."""
    settings.CHANNEL_LAYERS = {"default": redis_channel_layer(redis_url())}
    headers = session_headers()

    async def run():
        from channels.layers import get_channel_layer

        assert type(get_channel_layer()).__name__ == "RedisChannelLayer"
        comm, ok = await connect("/ws/events", headers)
        assert ok
        await comm.receive_json_from(timeout=3)
        ids = {await asyncio.to_thread(write_event, f"via redis {i}") for i in range(3)}
        got, _ = await collect(comm, ids, timeout=3)
        assert ids <= set(got)
        await comm.disconnect()
    run_async(run)


IDLE = 65.0  # seconds: well past redis-py 8's 5 s socket timeout, and past a minute


@pytest.mark.slow
def test_an_idle_dashboard_socket_stays_up_over_redis(settings):
    """Issue 8, part 8: with REDIS_URL set (the production channel layer, configured as
    settings.py does) a dashboard socket that hears nothing for over a minute stays
    connected — channels_redis waits 5 s for a message, and redis-py 8's default 5 s
    socket timeout used to end that wait with TimeoutError, closing every idle socket
    about every 5.5 s — and still gets the next event promptly."""
    settings.CHANNEL_LAYERS = {"default": redis_channel_layer(redis_url())}
    headers = session_headers()

    async def run():
        comm, ok = await connect("/ws/events", headers)
        assert ok
        assert (await comm.receive_json_from(timeout=3))["type"] == "events"
        t0 = time.monotonic()
        while time.monotonic() - t0 < IDLE:
            # Raises what ended the consumer (redis TimeoutError) if it died; a close
            # message would be output, which receive_nothing reports as False.
            assert await comm.receive_nothing(timeout=1.0, interval=0.05), (
                f"the socket got a message (closed?) after {time.monotonic() - t0:.1f} s "
                "idle")
        assert not comm.future.done(), "the consumer ended while idle"
        t1 = time.monotonic()
        ids = {await asyncio.to_thread(write_event, "after a quiet minute")}
        got, _ = await collect(comm, ids, timeout=3)
        assert ids <= set(got), "the event did not arrive after the idle minute"
        assert time.monotonic() - t1 < 1.5
        await comm.disconnect()
    run_async(run)
