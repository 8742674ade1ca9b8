"""Web hardening (issue 8, part 2 and the slow body of part 4):

- login (dashboard and admin) is throttled with django-axes: a user name from one
  address is locked out after HADASH_LOGIN_FAILURES (5) wrong passwords, and the right
  password is then refused with a clear message; other users and addresses are not;
- pages send a Content-Security-Policy that allows no inline code, and the templates
  and scripts need none;
- a request that does not arrive whole within HADASH_REQUEST_TIMEOUT gets a JSON 408
  and its connection closed — against a real daphne, with raw sockets — while normal
  requests, keep-alive connections and websockets are unaffected.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.test import AsyncClient, Client

from hadash.supervisor import ROOT, daphne_argv, free_port, wait_for_port

LOCKED = "Too many failed logins"
WRONG = "did not match"


@pytest.fixture
def users(db):
    User = get_user_model()
    op = User.objects.create_user("op", password="right-pw-123")
    other = User.objects.create_user("other", password="other-pw-123")
    boss = User.objects.create_superuser("boss", password="boss-pw-1234")
    return op, other, boss


def login(client, username, password, ip="127.0.0.1", path="/login/"):
    return client.post(path, {"username": username, "password": password, "next": "/"},
                       REMOTE_ADDR=ip)


def logged_in(client) -> bool:
    return "_auth_user_id" in client.session


# --- login throttling (django-axes) -------------------------------------------------------


def test_sixth_wrong_password_locks_out_even_the_right_one(users):
    c = Client()
    for i in range(4):
        r = login(c, "op", f"wrong-{i}")
        assert r.status_code == 200 and WRONG in r.content.decode()
    r = login(c, "op", "wrong-4")  # the 5th failure: locked from now on
    assert r.status_code == 429 and LOCKED in r.content.decode()
    r = login(c, "op", "wrong-5")
    assert r.status_code == 429 and LOCKED in r.content.decode()
    r = login(c, "op", "right-pw-123")
    body = r.content.decode()
    assert r.status_code == 429, body
    assert LOCKED in body and "for op" in body and "15 minutes" in body
    assert not logged_in(c)
    assert Client().get("/").status_code == 302  # still a stranger

    # Another user from the same address, and the same user from another address,
    # are not affected.
    c2 = Client()
    assert login(c2, "other", "other-pw-123").status_code == 302 and logged_in(c2)
    c3 = Client()
    assert login(c3, "op", "right-pw-123", ip="10.9.8.7").status_code == 302
    assert logged_in(c3)


def test_a_success_before_the_limit_starts_the_count_again(users):
    c = Client()
    for i in range(4):
        login(c, "op", f"wrong-{i}")
    assert login(c, "op", "right-pw-123").status_code == 302
    c = Client()
    for i in range(4):
        assert login(c, "op", f"wrong-again-{i}").status_code == 200
    assert login(c, "op", "right-pw-123").status_code == 302


def test_the_lockout_ends_after_the_cool_off(users, settings):
    settings.AXES_COOLOFF_TIME = dt.timedelta(seconds=8)  # generous: a busy machine
    c = Client()
    for i in range(5):
        login(c, "op", f"wrong-{i}")
    assert login(c, "op", "right-pw-123").status_code == 429
    time.sleep(8.5)
    assert login(c, "op", "right-pw-123").status_code == 302 and logged_in(c)


def test_admin_login_is_throttled_too(users):
    c = Client()
    for i in range(5):
        r = login(c, "boss", f"wrong-{i}", path="/admin/login/")
    assert r.status_code == 429 and LOCKED in r.content.decode()
    r = login(c, "boss", "boss-pw-1234", path="/admin/login/")
    assert r.status_code == 429 and not logged_in(c)
    # The dashboard login is the same lock (same user name, same address).
    assert login(c, "boss", "boss-pw-1234").status_code == 429


@pytest.mark.django_db(transaction=True)
def test_lockout_through_the_asgi_handler():
    """daphne serves Django through the ASGI handler, where axes's middleware runs
    its async path: the lockout holds there as well."""
    get_user_model().objects.create_user("op", password="right-pw-123")

    async def run():
        c = AsyncClient()
        for i in range(5):
            await c.post("/login/", {"username": "op", "password": f"wrong-{i}"})
        r = await c.post("/login/", {"username": "op", "password": "right-pw-123"})
        assert r.status_code == 429 and LOCKED in r.content.decode()
        r = await AsyncClient().post("/login/", {"username": "other",
                                                 "password": "other-pw-123"})
        assert r.status_code == 302  # another user from the same address
    get_user_model().objects.create_user("other", password="other-pw-123")
    async_to_sync(run)()


# --- Content-Security-Policy ----------------------------------------------------------------


def csp(response) -> dict[str, str]:
    header = response["Content-Security-Policy"]
    return {d.split()[0]: d.strip() for d in header.split(";") if d.strip()}


def test_pages_send_a_policy_without_inline_code(users):
    op = users[0]
    c = Client()
    pages = [c.get("/login/"), c.get("/admin/login/")]
    c.force_login(op)
    pages += [c.get("/"), c.get("/work"), c.get("/config"), c.get("/incidents")]
    for r in pages:
        assert r.status_code == 200, r
        policy = csp(r)
        assert policy["script-src"] == "script-src 'self'"
        assert policy["style-src"] == "style-src 'self'"
        assert policy["default-src"] == "default-src 'self'"
        assert policy["object-src"] == "object-src 'none'"
        assert policy["frame-ancestors"] == "frame-ancestors 'none'"
        assert "unsafe" not in r["Content-Security-Policy"]


INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>", re.I)
HANDLER_ATTR = re.compile(r"""\son[a-z]+\s*=\s*["']""", re.I)
STYLE_ATTR = re.compile(r"""\sstyle\s*=\s*\\?["']""", re.I)


def test_templates_and_scripts_need_no_inline_code():
    """What the policy would block: inline <script>, on…= handlers, style="…" (also in
    HTML the dashboard's scripts build)."""
    files = [*Path(ROOT, "templates").rglob("*.html"),
             *Path(ROOT, "dashboard", "static").rglob("*.js")]
    assert len(files) > 5
    found = []
    for path in files:
        text = path.read_text()
        for rx in (HANDLER_ATTR, STYLE_ATTR) + ((INLINE_SCRIPT,) if path.suffix == ".html"
                                                 else ()):
            found += [f"{path.relative_to(ROOT)}: {m.group(0)!r}" for m in rx.finditer(text)]
    assert found == []


# --- a slow request against a real daphne -------------------------------------------------

DEADLINE = 2  # HADASH_REQUEST_TIMEOUT for the daphne under test


def database_url() -> str:
    s = connection.settings_dict
    if s["ENGINE"].endswith("sqlite3"):
        return "sqlite:///" + str(Path(s["NAME"]).resolve())
    user = quote(s.get("USER") or "postgres", safe="")
    password = quote(s.get("PASSWORD") or "", safe="")
    auth = f"{user}:{password}@" if password else f"{user}@"
    return (f"postgres://{auth}{s.get('HOST') or '127.0.0.1'}:{s.get('PORT') or 5432}/"
            f"{quote(s['NAME'], safe='')}")


@pytest.fixture
def daphne(tmp_path, transactional_db):
    """daphne serving hadash on the test database, with a 2 s request deadline."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url(), "HADASH_VAR_DIR": str(tmp_path),
           "HADASH_REQUEST_TIMEOUT": str(DEADLINE)}
    log = (tmp_path / "daphne.log").open("w")
    proc = subprocess.Popen([sys.executable, *daphne_argv(port)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, proc=proc, timeout=60)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        text = (tmp_path / "daphne.log").read_text()
        assert "Traceback" not in text, text


def read_all(sock: socket.socket, timeout: float = 15.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


# With credentials (not valid ones): without any, the request is refused from its
# headers at once (test_unauthenticated_bodies_are_refused_before_they_are_read).
POST_HEAD = (b"POST /api/v1/hosts HTTP/1.1\r\nHost: 127.0.0.1\r\n"
             b"Authorization: Bearer not-a-token\r\n"
             b"Content-Type: application/json\r\nContent-Length: 40\r\n\r\n")


def test_a_stalled_body_gets_408_and_is_disconnected(daphne):
    with socket.create_connection(("127.0.0.1", daphne)) as s:
        s.sendall(POST_HEAD + b'{"name": ')
        t0 = time.monotonic()
        raw = read_all(s)  # returns when the server closes the connection
        waited = time.monotonic() - t0
    status, headers, body = answer(raw)
    assert status == 408
    assert headers["content-type"] == "application/json"
    assert "within 2 s" in json.loads(body)["error"]
    assert waited >= DEADLINE - 0.5, "answered before the deadline: not a timeout"


def test_a_trickling_body_times_out_although_bytes_keep_coming(daphne):
    """One byte every 0.3 s resets Twisted's own idle timer forever; the deadline
    counts from the request's first byte."""
    with socket.create_connection(("127.0.0.1", daphne)) as s:
        s.sendall(POST_HEAD)
        t0 = time.monotonic()
        closed = b""
        for _ in range(40):  # at most 12 s
            try:
                s.sendall(b" ")
            except OSError:
                break
            s.settimeout(0.3)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            closed += chunk
            if not chunk or b"\r\n\r\n" in closed:
                break
        raw = closed + read_all(s)
        assert time.monotonic() - t0 < 12
    status, headers, body = answer(raw)
    assert status == 408 and "error" in json.loads(body)


def test_stalled_headers_get_408(daphne):
    with socket.create_connection(("127.0.0.1", daphne)) as s:
        s.sendall(b"GET /login/ HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Ag")
        status, _, body = answer(read_all(s))
    assert status == 408 and "error" in json.loads(body)


def test_prompt_requests_and_idle_keep_alive_connections_are_served(daphne):
    """A body sent in pieces within the deadline is answered by the application; a
    keep-alive connection idle for longer than the deadline between requests stays
    usable (the deadline is per request, from its first byte)."""
    with socket.create_connection(("127.0.0.1", daphne)) as s:
        s.sendall(POST_HEAD)
        time.sleep(0.5)
        s.sendall(b'{"name": "kvm-1", "cluster": "c1"}'.ljust(40))
        s.settimeout(15)
        status, _, _ = answer(s.recv(65536))
        assert status in (401, 403)  # the API's answer to a request without a token
        time.sleep(DEADLINE + 1)
        s.sendall(b"GET /login/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        status, headers, _ = answer(read_all(s))
        assert status == 200
        assert "script-src 'self'" in headers["content-security-policy"]


def test_a_websocket_outlives_the_request_deadline(daphne):
    """The dashboard's socket is a request until its upgrade; after that no deadline
    applies: it stays open past it and still delivers events."""
    import aiohttp

    from hadash.choices import Subject
    from hadash.events import record_event

    def write_event(message):  # committed from another thread, as the engine does
        try:
            with transaction.atomic():
                record_event(Subject.ENGINE, None, name="t", event="Test", message=message)
        finally:
            connection.close()

    user = get_user_model().objects.create_user("op", password="pw-123456")
    c = Client()
    c.force_login(user)
    cookie = f"sessionid={c.cookies['sessionid'].value}"

    async def run():
        async with aiohttp.ClientSession() as session, session.ws_connect(
                f"http://127.0.0.1:{daphne}/ws/events",
                headers={"Cookie": cookie, "Origin": f"http://127.0.0.1:{daphne}"}) as ws:
            first = await ws.receive_json(timeout=10)
            assert first["type"] == "events"
            await asyncio.sleep(DEADLINE + 1.5)
            assert not ws.closed
            await asyncio.to_thread(write_event, "after the deadline")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                msg = await ws.receive_json(timeout=10)
                if any(e["message"] == "after the deadline" for e in msg.get("events", [])):
                    return
            raise AssertionError("the event did not arrive")
    async_to_sync(run)()


@pytest.mark.parametrize("head, status", [
    # Agent protocol: no credentials; a Content-Length over the 4 MiB limit.
    (b"POST /api/agent/v1/ping HTTP/1.1\r\nHost: 127.0.0.1\r\n"
     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n", 401),
    (b"POST /api/agent/v1/ping HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer x\r\n"
     b"Content-Type: application/json\r\nContent-Length: 99999999\r\n\r\n", 413),
    # Operator API: no credentials; a body over its limit.
    (b"PUT /api/v1/config/ha.workers HTTP/1.1\r\nHost: 127.0.0.1\r\n"
     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n", 401),
    (b"POST /api/v1/vms HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer x\r\n"
     b"Content-Type: application/json\r\nContent-Length: 99999999\r\n\r\n", 413),
])
def test_unauthenticated_bodies_are_refused_before_they_are_read(daphne, head, status):
    """Issue 8 part 4: refused by their headers at once — the client has sent no body
    byte, and gets its JSON answer well before the request deadline."""
    with socket.create_connection(("127.0.0.1", daphne)) as s:
        s.sendall(head)  # and not one byte of the body
        t0 = time.monotonic()
        raw = read_all(s)
        waited = time.monotonic() - t0
    got, headers, body = answer(raw)
    assert got == status, raw
    assert headers["content-type"] == "application/json" and json.loads(body)["error"]
    assert waited < DEADLINE - 0.5, "answered by the deadline, not from the headers"


def test_an_over_size_websocket_report_gets_an_error_message_not_a_closed_socket(daphne):
    """Issue 8 part 4 through a real daphne: a websocket message over the protocol's
    4 MiB limit is answered with an error message (daphne's own 1 MiB cap would close
    the socket first), and the socket goes on serving pings."""
    import aiohttp
    import httpx

    base = f"http://127.0.0.1:{daphne}"
    body = {"name": "kvm-big", "type": "Routing", "hypervisor": "KVM", "cluster": "c1",
            "cpus": 8, "memory_mb": 16384, "address": "127.0.0.1",
            "agent_url": "http://127.0.0.1:9/agent", "vms": []}
    resp = httpx.post(f"{base}/api/agent/v1/connect", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {settings.HADASH_AGENT_KEY}"})
    assert resp.status_code == 200, resp.text
    token = resp.json()["token"]

    async def run():
        async with aiohttp.ClientSession() as session, session.ws_connect(
            f"ws://127.0.0.1:{daphne}/api/agent/v1/ws",
            headers={"Authorization": f"Bearer {token}"}, max_msg_size=0,
        ) as ws:
            await ws.send_str(json.dumps({"type": "ping", "vms": [], "pad": "x" * (5 << 20)}))
            first = json.loads((await ws.receive(timeout=30)).data)
            await ws.send_str(json.dumps({"type": "ping", "vms": []}))
            second = json.loads((await ws.receive(timeout=30)).data)
            return first, second

    first, second = asyncio.run(run())
    assert first["type"] == "error" and "too large" in first["error"], first
    assert second["type"] == "pong"
