"""Trust boundaries of the agent protocol (SPEC §12, R29–R31; PROTOCOL.md v1.1;
issue 8 items 1–4, agent side).

* R29 — the join key enrols new names only; an enrolled host reconnects with its own
  token (never rotated by a reconnect); type and cluster are the operator's; an
  operator's re-enrolment (model, admin, API, dashboard) lets one join-key connect
  take the host within an hour.
* R30 — tokens are random and stored hashed; the server presents its own
  ``server_token`` to agents, and it is shown to nobody.
* R31 — ``agent_url`` and ``address`` are checked (scheme, no user/query/fragment,
  base path only, inside HADASH_AGENT_NETWORKS, never link-local) at connect and
  before each call; a hostile string (a lone surrogate) is a JSON 400 or a websocket
  error and never hurts another agent; one report that cannot be stored never costs
  the rest of its batch; bad credentials and oversized bodies are refused before the
  body is read.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import connection
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from hadash.models import ApiToken, Event, HaWork
from hadash.names import NAME_RULE
from hosts.agent import ingest, networks
from hosts.agent_http import AgentAuthError, HttpAgentClient
from hosts.choices import HostEvent, HostStatus, HostType
from hosts.models import REENROL_WINDOW, Host
from hosts.tests.agent_server import agent
from hosts.transport import Unreachable
from vms.choices import PowerState, VmState
from vms.models import VMInstance

CONNECT = "/api/agent/v1/connect"
PING = "/api/agent/v1/ping"
DISCONNECT = "/api/agent/v1/disconnect"
WS = "/api/agent/v1/ws"
TIMEOUT = 5

ALREADY = ("host kvm-01 is already enrolled; it reconnects with its own token, or an "
           "operator re-enrols it")


def body(name: str = "kvm-01", **overrides) -> dict:
    b = {"name": name, "type": "Routing", "hypervisor": "KVM", "cluster": "c1", "cpus": 32,
         "memory_mb": 131072, "address": "10.0.0.11", "agent_url": "http://10.0.0.11:8250",
         "vms": []}
    b.update(overrides)
    return b


def post(client, path: str, data, token: str | None):
    raw = data if isinstance(data, str | bytes) else json.dumps(data)
    extra = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token is not None else {}
    return client.post(path, data=raw, content_type="application/json", **extra)


def db_state() -> dict:
    return {
        "hosts": list(Host.objects.order_by("pk").values()),
        "vms": list(VMInstance.objects.order_by("pk").values()),
        "events": list(Event.objects.order_by("pk").values_list("pk", flat=True)),
        "ha_work": HaWork.objects.count(),
    }


def enrol(client, agent_key, name="kvm-01", **overrides) -> dict:
    resp = post(client, CONNECT, body(name, **overrides), agent_key)
    assert resp.status_code == 200, resp.content
    return resp.json()


# --- R29: enrolment -----------------------------------------------------------------


@pytest.mark.django_db
def test_r29_join_key_cannot_take_over_an_enrolled_host(client, agent_key):
    """R29 (issue 8 item 1): someone with the join key connects under an enrolled
    host's name — with its own agent_url, type TrafficMonitor, another cluster and a
    power report that would schedule HA work: 409, nothing written, the real agent's
    token unchanged and its pings still land."""
    real = enrol(client, agent_key, vms=[])
    VMInstance.objects.create(name="web-1", state=VmState.RUNNING, host_id=real["host_id"],
                              power_state=PowerState.POWER_ON, power_host_id=real["host_id"],
                              ha_enabled=True)
    before = db_state()
    attack = body(type="TrafficMonitor", cluster="evil", agent_url="http://10.6.6.6:80",
                  address="10.6.6.6", vms=[{"name": "web-1", "power_state": "PowerOff"}])
    resp = post(client, CONNECT, attack, agent_key)
    assert resp.status_code == 409
    assert resp.json() == {"error": ALREADY}
    assert db_state() == before
    host = Host.objects.get(name="kvm-01")
    assert host.token_matches(real["token"]) and host.server_token == real["server_token"]
    assert (host.type, host.cluster, host.agent_url) == ("Routing", "c1", "http://10.0.0.11:8250")
    ping = post(client, PING, {"vms": [{"name": "web-1", "power_state": "PowerOn"}]},
                real["token"])
    assert ping.status_code == 200
    assert not HaWork.objects.exists()


@pytest.mark.django_db
def test_r29_reconnect_keeps_type_cluster_and_token(client, agent_key):
    """R29: a reconnect with the host's own token reuses the row and echoes the same
    token and server_token; it updates what the agent knows (CPUs, memory, URL,
    address) but not type or cluster — TrafficMonitor cannot be chosen by a reconnect
    to leave the monitoring (R2)."""
    first = enrol(client, agent_key)
    resp = post(client, CONNECT, body(type="TrafficMonitor", cluster="c9", cpus=64,
                                      memory_mb=262144, address="10.0.0.12",
                                      agent_url="http://10.0.0.12:8250"), first["token"])
    assert resp.status_code == 200, resp.content
    again = resp.json()
    assert (again["host_id"], again["token"], again["server_token"]) == (
        first["host_id"], first["token"], first["server_token"])
    host = Host.objects.get(pk=first["host_id"])
    assert (host.type, host.cluster) == (HostType.ROUTING, "c1")
    assert (host.cpus, host.memory_mb, host.private_ip_address, host.agent_url) == (
        64, 262144, "10.0.0.12", "http://10.0.0.12:8250")
    assert host.status == HostStatus.UP
    # A lost answer never locks the agent out: the token it holds still works.
    assert post(client, PING, {"vms": []}, first["token"]).status_code == 200


@pytest.mark.django_db
def test_r29_host_token_reconnects_its_own_host_only(client, agent_key):
    """R29: a host's token cannot connect (or create) another name."""
    first = enrol(client, agent_key)
    enrol(client, agent_key, name="kvm-02")
    before = db_state()
    for name in ("kvm-02", "kvm-03"):
        resp = post(client, CONNECT, body(name), first["token"])
        assert resp.status_code == 401 and resp.json()["error"]
    assert db_state() == before


@pytest.mark.django_db
def test_r29_reenrol_window_takes_one_join_key_connect(client, agent_key):
    """R29: an operator re-enrols a host (ReEnrolAllowed event). Within the hour one
    join-key connect takes it: new token and server_token, the old token refused, a
    ReEnrolled event; type and cluster stay. A second join-key connect is 409."""
    old = enrol(client, agent_key, type="ConsoleProxy", cluster="c2")
    host = Host.objects.get(name="kvm-01")
    now = timezone.now()
    until = host.allow_reenrol(now=now, by="alice")
    assert until == now + REENROL_WINDOW == now + dt.timedelta(hours=1)
    ev = Event.objects.get(event=HostEvent.REENROL_ALLOWED)
    assert (ev.host_id, ev.reason) == (host.pk, "alice") and "alice" in ev.message
    # The current token works until the window is used.
    assert post(client, PING, {"vms": []}, old["token"]).status_code == 200

    resp = post(client, CONNECT, body(type="TrafficMonitor", cluster="c9"), agent_key)
    assert resp.status_code == 200, resp.content
    new = resp.json()
    assert new["host_id"] == old["host_id"]
    assert new["token"] != old["token"] and new["server_token"] != old["server_token"]
    host.refresh_from_db()
    assert host.reenrol_until is None
    assert (host.type, host.cluster) == (HostType.CONSOLE_PROXY, "c2")
    assert host.token_matches(new["token"]) and not host.token_matches(old["token"])
    assert host.server_token == new["server_token"]
    assert Event.objects.filter(event=HostEvent.REENROLLED, host=host).count() == 1
    assert post(client, PING, {"vms": []}, old["token"]).status_code == 401
    assert post(client, PING, {"vms": []}, new["token"]).status_code == 200

    before = db_state()
    resp = post(client, CONNECT, body(), agent_key)
    assert resp.status_code == 409 and resp.json() == {"error": ALREADY}
    assert db_state() == before


@pytest.mark.django_db
def test_r29_reenrol_window_closes_after_an_hour(client, agent_key):
    """R29: a re-enrolment opened more than an hour ago lets nobody in."""
    enrol(client, agent_key)
    host = Host.objects.get(name="kvm-01")
    host.allow_reenrol(now=timezone.now() - REENROL_WINDOW - dt.timedelta(seconds=1), by="bob")
    before = db_state()
    resp = post(client, CONNECT, body(), agent_key)
    assert resp.status_code == 409
    assert db_state() == before


@pytest.mark.django_db
def test_r29_a_new_name_still_enrols_and_type_is_taken_from_the_agent(client, agent_key):
    """R29: the join key still enrols a name the server does not know, type and cluster
    as the agent says."""
    new = enrol(client, agent_key, name="store-1", type="SecondaryStorage", cluster="c7")
    host = Host.objects.get(pk=new["host_id"])
    assert (host.type, host.cluster) == ("SecondaryStorage", "c7")


# --- R30: tokens -----------------------------------------------------------------


@pytest.mark.django_db
def test_r30_tokens_are_random_hashed_and_not_derivable(client, agent_key):
    """R30: two enrolments get different tokens and server tokens of ≥ 32 random bytes;
    the database holds only the token's SHA-256; the token is not the old HMAC of
    SECRET_KEY over the host's uuid (readable by any operator)."""
    a, b = enrol(client, agent_key, name="kvm-01"), enrol(client, agent_key, name="kvm-02")
    assert len({a["token"], b["token"], a["server_token"], b["server_token"]}) == 4
    for creds in (a, b):
        assert len(creds["token"]) >= 43 and len(creds["server_token"]) >= 43
    host = Host.objects.get(pk=a["host_id"])
    assert host.token_hash == hashlib.sha256(a["token"].encode()).hexdigest()
    dump = json.dumps(list(Host.objects.values()), default=str)
    assert a["token"] not in dump and b["token"] not in dump
    for generation in range(3):
        derived = hmac.new(settings.SECRET_KEY.encode(), f"{host.uuid}:{generation}".encode(),
                           hashlib.sha256).hexdigest()
        assert derived != a["token"]


@pytest.mark.django_db
def test_r30_server_token_is_what_the_server_presents(client, agent_key):
    """R30: the server's calls carry the server_token from the connect answer (a fake
    agent checks it); an agent holding anything else refuses; the host's own token is
    not accepted in its place."""
    with agent("kvm-01", token="set-below") as fake:
        creds = enrol(client, agent_key, agent_url=fake.url)
        host = Host.objects.get(pk=creds["host_id"])
        with HttpAgentClient(read_timeout=3) as http:
            fake.token = creds["server_token"]
            assert http.check_health(host) is True
            assert fake.seen[-1].authorization == f"Bearer {creds['server_token']}"
            fake.token = creds["token"]  # an agent that expects its own token refuses
            assert http.check_health(host) is False
            with pytest.raises(AgentAuthError):
                http.get_vm(host, "web-1")


@pytest.mark.django_db
def test_r30_server_token_is_shown_to_nobody(client, agent_key, admin_client):
    """R30: neither token appears in the operator API, the admin page, the dashboard
    or any event."""
    creds = enrol(client, agent_key)
    host = Host.objects.get(pk=creds["host_id"])
    host.allow_reenrol(now=timezone.now(), by="admin")
    staff = get_user_model().objects.create_user("ops", password="x", is_staff=True)
    _, key = ApiToken.issue(staff)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    pages = [
        api.get("/api/v1/hosts/kvm-01").content,
        api.get("/api/v1/hosts").content,
        api.get("/api/v1/events").content,
        admin_client.get(f"/admin/hosts/host/{host.pk}/change/").content,
        admin_client.get("/admin/hosts/host/").content,
    ]
    dash = Client()
    dash.force_login(staff)
    pages.append(dash.get("/hosts/kvm-01").content)
    pages.append(json.dumps(list(Event.objects.values()), default=str).encode())
    for page in pages:
        assert creds["server_token"].encode() not in page
        assert creds["token"].encode() not in page


# --- R29: operator re-enrolment in admin, API and dashboard -----------------------


@pytest.mark.django_db
def test_r29_reenrol_from_the_operator_api_admins_only(client, agent_key):
    """R29: POST /api/v1/hosts/{name}/reenrol (admins) opens the window and answers the
    host with reenrol_until; a read-only user gets 403 and nothing changes."""
    enrol(client, agent_key)
    admin = get_user_model().objects.create_user("ops", password="x", is_staff=True)
    reader = get_user_model().objects.create_user("viewer", password="x")
    apis = {}
    for user in (admin, reader):
        _, key = ApiToken.issue(user)
        apis[user.username] = APIClient()
        apis[user.username].credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    before = db_state()
    r = apis["viewer"].post("/api/v1/hosts/kvm-01/reenrol")
    assert r.status_code == 403 and r.json()["error"]
    assert db_state() == before
    assert apis["ops"].post("/api/v1/hosts/nope/reenrol").status_code == 404
    r = apis["ops"].post("/api/v1/hosts/kvm-01/reenrol")
    assert r.status_code == 200, r.content
    data = r.json()
    assert data["name"] == "kvm-01" and data["reenrol_until"]
    assert "server_token" not in data and "token_hash" not in data
    ev = Event.objects.get(event=HostEvent.REENROL_ALLOWED)
    assert ev.reason == "ops"
    assert post(client, CONNECT, body(), agent_key).status_code == 200


@pytest.mark.django_db
def test_r29_reenrol_from_django_admin(client, agent_key, admin_client):
    """R29: the admin action "Re-enrol selected hosts" opens the window for each."""
    enrol(client, agent_key, name="kvm-01")
    enrol(client, agent_key, name="kvm-02")
    ids = list(Host.objects.filter(name="kvm-01").values_list("pk", flat=True))
    r = admin_client.post("/admin/hosts/host/", {"action": "allow_reenrol",
                                                  "_selected_action": ids}, follow=True)
    assert r.status_code == 200
    assert b"Re-enrolment allowed" in r.content
    assert Host.objects.get(name="kvm-01").reenrol_open(timezone.now())
    assert not Host.objects.get(name="kvm-02").reenrol_open(timezone.now())
    assert post(client, CONNECT, body("kvm-01"), agent_key).status_code == 200
    assert post(client, CONNECT, body("kvm-02"), agent_key).status_code == 409


@pytest.mark.django_db
def test_r29_type_and_cluster_are_changed_by_an_operator(client, agent_key, admin_client):
    """R29: an operator changes an enrolled host's type and cluster (Django admin, with
    a SettingsChanged event); the agent's next reconnect keeps them."""
    creds = enrol(client, agent_key, type="TrafficMonitor", cluster="c1")
    host = Host.objects.get(pk=creds["host_id"])
    r = admin_client.post(f"/admin/hosts/host/{host.pk}/change/",
                          {"type": "Routing", "cluster": "c2", "tags": ""})
    assert r.status_code == 302, r.content.decode()[:2000]
    host.refresh_from_db()
    assert (host.type, host.cluster) == ("Routing", "c2")
    ev = Event.objects.get(event="SettingsChanged", host=host)
    assert "TrafficMonitor" in ev.message and "c2" in ev.message
    assert post(client, CONNECT, body(type="TrafficMonitor", cluster="c1"),
                creds["token"]).status_code == 200
    host.refresh_from_db()
    assert (host.type, host.cluster) == ("Routing", "c2")


@pytest.mark.django_db
def test_r29_reenrol_from_the_dashboard_needs_an_admin_and_a_confirmation(client, agent_key):
    """R29: the host page's Re-enrol button (admins) needs its confirmation box ticked;
    operators (read-only) get 403 and do not see it."""
    enrol(client, agent_key)
    users = get_user_model().objects
    adam = users.create_user("adam", password="pw-123456")
    adam.groups.add(Group.objects.get(name="admins"))
    olga = users.create_user("olga", password="pw-123456")
    olga.groups.add(Group.objects.get(name="operators"))
    adm, op = Client(), Client()
    adm.force_login(adam)
    op.force_login(olga)
    assert b'id="host-action-reenrol"' in adm.get("/hosts/kvm-01").content
    assert b'id="host-action-reenrol"' not in op.get("/hosts/kvm-01").content
    before = db_state()
    assert op.post("/hosts/kvm-01/reenrol", {"confirm": "yes"}).status_code == 403
    r = adm.post("/hosts/kvm-01/reenrol", {}, follow=True)  # not confirmed
    assert b"not confirmed" in r.content
    assert db_state() == before
    r = adm.post("/hosts/kvm-01/reenrol", {"confirm": "yes"}, follow=True)
    assert r.status_code == 200 and b"re-enrolment allowed until" in r.content
    assert Event.objects.get(event=HostEvent.REENROL_ALLOWED).reason == "adam"
    assert post(client, CONNECT, body(), agent_key).status_code == 200


# --- R31: where the server may call -------------------------------------------------


BAD_URLS = [
    ("metadata", "http://169.254.169.254/latest", "link-local"),
    ("metadata-v6", "http://[fe80::1]:8250", "link-local"),
    ("metadata-mapped", "http://[::ffff:169.254.169.254]:80", "link-local"),
    ("metadata-decimal", "http://2852039166/", "neither an IP address nor a DNS name"),
    ("credentials", "http://user:pass@10.0.0.11:8250", "user or password"),
    ("user-only", "http://root@10.0.0.11:8250", "user or password"),
    ("query", "http://10.0.0.11:8250/?x", "query"),
    ("empty-query", "http://10.0.0.11:8250?", "query"),
    ("fragment", "http://10.0.0.11:8250/#y", "fragment"),
    ("ftp", "ftp://10.0.0.11/", "http"),
    ("file", "file:///etc/passwd", "http"),
    ("outside", "http://8.8.8.8:8250", "outside HADASH_AGENT_NETWORKS"),
    ("unspecified", "http://0.0.0.0:8250", "unspecified"),
    ("multicast", "http://224.0.0.1:8250", "multicast"),
    ("dot-dot", "http://10.0.0.11:8250/a/../admin", "base path"),
    ("encoded-path", "http://10.0.0.11:8250/a%2F..", "base path"),
    ("unresolvable", "http://no-such-host.invalid:8250", "does not resolve"),
    ("port-0", "http://10.0.0.11:0", "port 0"),
]


@pytest.mark.django_db
@pytest.mark.parametrize("url,word", [c[1:] for c in BAD_URLS], ids=[c[0] for c in BAD_URLS])
def test_r31_agent_url_refused_at_connect_with_the_reason(client, agent_key, url, word):
    """R31: an agent_url the server must not call is refused at connect with a 400 that
    says why — for a new host and for a reconnect — and nothing is written."""
    creds = enrol(client, agent_key, name="kvm-02")
    for name, token in (("kvm-01", agent_key), ("kvm-02", creds["token"])):
        before = db_state()
        resp = post(client, CONNECT, body(name, agent_url=url), token)
        assert resp.status_code == 400, (url, resp.content)
        message = resp.json()["error"]
        assert "agent_url" in message and word in message, message
        assert db_state() == before


BAD_ADDRESSES = [
    ("metadata", "169.254.169.254", "link-local"),
    ("outside", "8.8.8.8", "outside"),
    ("v6-link-local", "fe80::1", "link-local"),
    ("not-a-host", "10.0.0.11/32", "neither"),
]


@pytest.mark.django_db
@pytest.mark.parametrize("address,word", [c[1:] for c in BAD_ADDRESSES],
                         ids=[c[0] for c in BAD_ADDRESSES])
def test_r31_address_refused_at_connect(client, agent_key, address, word):
    """R31: the address neighbours would probe (check-on-host) passes the same check."""
    before = db_state()
    resp = post(client, CONNECT, body(address=address), agent_key)
    assert resp.status_code == 400
    message = resp.json()["error"]
    assert "address" in message and word in message, message
    assert db_state() == before


@pytest.mark.django_db
def test_r31_allowed_urls_and_the_networks_setting(client, agent_key, settings):
    """R31: a base path, https, IPv6 loopback and a DNS name resolving inside the
    networks are fine; HADASH_AGENT_NETWORKS narrows the default; link-local stays
    refused even when listed."""
    ok = ["http://10.0.0.11:8250/agents/kvm-01", "https://192.168.1.5", "http://[::1]:9",
          "http://localhost:8250/", "http://172.16.0.1"]
    for i, url in enumerate(ok):
        assert post(client, CONNECT, body(f"h{i}", agent_url=url), agent_key).status_code \
            == 200, url
    settings.HADASH_AGENT_NETWORKS = ["10.1.0.0/16", "169.254.0.0/16"]
    r = post(client, CONNECT, body("x1"), agent_key)
    assert r.status_code == 400 and "10.1.0.0/16" in r.json()["error"]
    r = post(client, CONNECT, body("x2", agent_url="http://169.254.1.1", address="10.1.2.3"),
             agent_key)
    assert r.status_code == 400 and "link-local" in r.json()["error"]
    r = post(client, CONNECT, body("x3", agent_url="http://10.1.2.3", address="10.1.2.3"),
             agent_key)
    assert r.status_code == 200


def test_r31_networks_default_lives_in_one_place(settings):
    """R31: unset, HADASH_AGENT_NETWORKS is networks.DEFAULT_AGENT_NETWORKS (loopback
    and the private ranges); a bad entry is named."""
    settings.HADASH_AGENT_NETWORKS = None
    assert [str(n) for n in networks.agent_networks()] == list(
        networks.DEFAULT_AGENT_NETWORKS)
    with pytest.raises(ValueError, match="'10.0.0.0/33'"):
        networks.parse_networks(["10.0.0.0/8", "10.0.0.0/33"])


@pytest.mark.django_db
def test_r31_stored_bad_agent_url_is_never_called():
    """R31: a host row holding a URL from before these checks (or a DNS name that now
    resolves elsewhere) is not called at all; a target's bad address is not passed to
    check-on-host, and a bad migration target is refused."""
    with agent("kvm-02", token="srv") as neighbour, HttpAgentClient(read_timeout=3) as http:
        bad = Host(name="kvm-01", agent_url="http://169.254.169.254/latest?",
                   private_ip_address="169.254.169.254", server_token="srv")
        assert http.check_health(bad) is False
        with pytest.raises(Unreachable, match="refused"):
            http.get_vm(bad, "web-1")
        good = Host(name="kvm-02", agent_url=neighbour.url, server_token="srv",
                    private_ip_address="10.0.0.12")
        neighbour.peers["kvm-01"] = True
        seen = len(neighbour.seen)
        assert http.check_on_host(good, bad) is True
        assert neighbour.seen[seen].body == {"name": "kvm-01", "address": ""}
        with pytest.raises(Exception, match="refused"):
            http.migrate_vm(good, "web-1", bad)
        assert all(s.path != "/vms/web-1/migrate" for s in neighbour.seen)


# --- R31: names ----------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("name", ["a/b", "../kvm", "kvm 01", "kvm-01?x", "-kvm", "kvm%2F01",
                                  "kvm\u00e9"])
def test_r31_host_names_follow_the_safe_character_set(client, agent_key, name):
    """R31 (issue 8 item 4): a host named a/b could never be reached in the API or
    dashboard, so never fenced: refused at connect with the rule, nothing written."""
    resp = post(client, CONNECT, body(name), agent_key)
    assert resp.status_code == 400
    assert NAME_RULE in resp.json()["error"]
    assert not Host.objects.exists() and not Event.objects.exists()


@pytest.mark.django_db
def test_r31_vm_names_outside_the_rule_are_ignored_not_fatal(client, agent_key):
    """A domain named outside hadash.names can never be a managed VM: like any unknown
    name it is ignored (R8), and the rest of the report still counts — one oddly named
    domain must not leave its host unheard (and so investigated, maybe fenced)."""
    creds = enrol(client, agent_key)
    host = Host.objects.get(name="kvm-01")
    host.last_ping = host.last_ping - dt.timedelta(minutes=5)
    host.save(update_fields=["last_ping"])
    before = db_state()
    resp = post(client, PING, {"vms": [{"name": "a/b", "power_state": "PowerOn"},
                                       {"name": "web server", "power_state": "PowerOff"}]},
                creds["token"])
    assert resp.status_code == 200, resp.content
    assert Host.objects.get(name="kvm-01").last_ping > host.last_ping  # the ping counted
    after = db_state()
    assert {k: after[k] for k in ("vms", "events", "ha_work")} == {
        k: before[k] for k in ("vms", "events", "ha_work")}  # nothing for those names
    # Malformed names are still refused as malformed (not text, control characters).
    resp = post(client, PING, {"vms": [{"name": "a\u0000b", "power_state": "PowerOn"}]},
                creds["token"])
    assert resp.status_code == 400 and "vms[0].name" in resp.json()["error"]


# --- R31: hostile strings --------------------------------------------------------------

SURROGATE = "\\ud800"  # as it travels in JSON: a lone surrogate, not text


def with_surrogate(field: str) -> str:
    """A connect body whose ``field`` carries a lone surrogate (JSON-escaped)."""
    b = body()
    if field == "vm":
        b["vms"] = [{"name": "MARK", "power_state": "PowerOn"}]
    else:
        b[field] = b[field] + "MARK" if field != "agent_url" else "http://10.0.0.11/MARK"
    return json.dumps(b).replace("MARK", SURROGATE)


@pytest.mark.django_db
@pytest.mark.parametrize("field", ["name", "type", "hypervisor", "cluster", "address",
                                   "agent_url", "vm"])
def test_r31_lone_surrogate_in_any_connect_string_is_a_json_400(client, agent_key, field):
    """R31 (issue 8 item 4): a lone surrogate (``\\ud800``) in any string an agent
    sends is a JSON 400 that says so — not an HTML 500 — and nothing is written."""
    before = db_state()
    resp = post(client, CONNECT, with_surrogate(field), agent_key)
    assert resp.status_code == 400, resp.content
    assert resp["Content-Type"] == "application/json"
    assert resp.json()["error"]
    assert db_state() == before


@pytest.mark.django_db
def test_r31_lone_surrogate_in_ping_and_disconnect(client, agent_key):
    creds = enrol(client, agent_key)
    before = db_state()
    raw = '{"vms": [{"name": "vm\\ud800", "power_state": "PowerOn"}]}'
    resp = post(client, PING, raw, creds["token"])
    assert resp.status_code == 400 and resp.json()["error"]
    raw = '{"vms": [{"name": "vm-1", "power_state": "Power\\udfffOn"}]}'
    assert post(client, PING, raw, creds["token"]).status_code == 400
    assert db_state() == before
    # A goodbye's reason is free text: the surrogate is replaced, the goodbye taken.
    resp = post(client, DISCONNECT, '{"reason": "bye \\ud800"}', creds["token"])
    assert resp.status_code == 200, resp.content
    assert Host.objects.get(name="kvm-01").status == HostStatus.DISCONNECTED


# --- R31: one bad report never costs the batch ------------------------------------


def _two_hosts(client, agent_key) -> tuple[str, str]:
    a = enrol(client, agent_key, name="kvm-01")["token"]
    b = enrol(client, agent_key, name="kvm-02")["token"]
    Host.objects.update(last_ping=timezone.now() - dt.timedelta(minutes=1))
    return a, b


@pytest.mark.django_db
def test_r31_a_report_that_cannot_be_stored_leaves_the_rest_of_its_batch(client, agent_key):
    """R31: a report that cannot be stored (a lone surrogate slipped past validation:
    no database can even compare it) fails alone; the other reports of the batch are
    applied."""
    a, b = _two_hosts(client, agent_key)
    stale = timezone.now() - dt.timedelta(minutes=1)
    results = ingest.apply_batch([(a, [("vm\ud800", "PowerOn")]), (b, [])])
    assert isinstance(results[0], Exception)
    assert results[1] == 10
    assert Host.objects.get(name="kvm-02").last_ping > stale
    assert Host.objects.get(name="kvm-01").last_ping <= stale


@pytest.fixture
def failing_host_row():
    """Call it to install a database trigger that refuses any UPDATE of host kvm-01's
    row: a real database error on one host, on PostgreSQL and SQLite alike."""
    installed = []

    def install():
        with connection.cursor() as cur:
            if connection.vendor == "postgresql":
                cur.execute("""CREATE FUNCTION hadash_test_refuse() RETURNS trigger AS $$
                               BEGIN RAISE EXCEPTION 'test: host row refused'; END;
                               $$ LANGUAGE plpgsql""")
                cur.execute("""CREATE TRIGGER hadash_test_refuse BEFORE UPDATE ON host
                               FOR EACH ROW WHEN (NEW.name = 'kvm-01')
                               EXECUTE FUNCTION hadash_test_refuse()""")
            else:
                cur.execute("""CREATE TRIGGER hadash_test_refuse BEFORE UPDATE ON host
                               WHEN NEW.name = 'kvm-01'
                               BEGIN SELECT RAISE(ABORT, 'test: host row refused'); END""")
        installed.append(True)

    yield install
    if installed:
        with connection.cursor() as cur:
            if connection.vendor == "postgresql":
                cur.execute("DROP TRIGGER IF EXISTS hadash_test_refuse ON host")
                cur.execute("DROP FUNCTION IF EXISTS hadash_test_refuse()")
            else:
                cur.execute("DROP TRIGGER IF EXISTS hadash_test_refuse")


@pytest.mark.django_db
def test_r31_a_database_error_on_one_host_row_costs_only_that_report(
        client, agent_key, failing_host_row):
    """R31 (issue 8 item 4): the batch's shared UPDATE fails on one host's row; the
    batch is applied report by report and only that host's ping is lost (its sender
    gets the error); the others' pings land."""
    a, b = _two_hosts(client, agent_key)
    failing_host_row()
    stale = timezone.now() - dt.timedelta(minutes=1)
    results = ingest.apply_batch([(a, []), (b, [])])
    assert isinstance(results[0], Exception) and "refused" in str(results[0])
    assert results[1] == 10
    assert Host.objects.get(name="kvm-02").last_ping > stale


# --- over the websocket ---------------------------------------------------------------


def _ws(token: str) -> WebsocketCommunicator:
    from hadash.asgi import application

    return WebsocketCommunicator(application, WS, headers=[
        (b"host", b"testserver"), (b"authorization", f"Bearer {token}".encode())])


def _ping(name="vm-1"):
    return json.dumps({"type": "ping", "vms": [{"name": name, "power_state": "PowerOn"}]})


@pytest.mark.django_db(transaction=True)
def test_r31_hostile_ws_messages_get_errors_and_other_sockets_keep_pinging(client, agent_key):
    """R31 (issue 8 item 4): one agent's lone surrogate — in a message, or in a report
    that fails in the database — gets that agent an error message, its socket stays up,
    and the other agents' pings, sent at the same moment, are all answered and
    stored."""
    tokens = [enrol(client, agent_key, name=f"kvm-0{i}")["token"] for i in range(1, 7)]
    Host.objects.update(last_ping=timezone.now() - dt.timedelta(minutes=1))
    stale = timezone.now() - dt.timedelta(seconds=30)
    bad = '{"type": "ping", "vms": [{"name": "x\\ud800", "power_state": "PowerOn"}]}'

    async def run():
        socks = [_ws(t) for t in tokens]
        for s in socks:
            assert (await s.connect(timeout=TIMEOUT))[0]
        await asyncio.gather(socks[0].send_to(text_data=bad),
                             *(s.send_to(text_data=_ping()) for s in socks[1:]))
        answers = [await s.receive_json_from(timeout=TIMEOUT) for s in socks]
        await socks[0].send_to(text_data=_ping())
        again = await socks[0].receive_json_from(timeout=TIMEOUT)
        for s in socks:
            await s.disconnect()
        return answers, again

    answers, again = async_to_sync(run)()
    assert answers[0]["type"] == "error" and "surrogate" in answers[0]["error"]
    assert [a["type"] for a in answers[1:]] == ["pong"] * 5
    assert again["type"] == "pong"  # the same socket goes on
    assert Host.objects.filter(last_ping__gt=stale).count() == 6


@pytest.mark.django_db(transaction=True)
def test_r31_a_ws_ping_that_fails_in_the_database_is_an_error_not_a_closed_socket(
        client, agent_key, failing_host_row):
    """R31: kvm-01's ping fails in the database (its row refuses updates): kvm-01 gets
    an error message and keeps its socket; kvm-02's ping in the same moment lands."""
    a, b = _two_hosts(client, agent_key)
    failing_host_row()
    stale = timezone.now() - dt.timedelta(seconds=30)

    async def run():
        sa, sb = _ws(a), _ws(b)
        assert (await sa.connect(timeout=TIMEOUT))[0] and (await sb.connect(timeout=TIMEOUT))[0]
        empty = json.dumps({"type": "ping", "vms": []})
        await asyncio.gather(sa.send_to(text_data=empty), sb.send_to(text_data=empty))
        ra = await sa.receive_json_from(timeout=TIMEOUT)
        rb = await sb.receive_json_from(timeout=TIMEOUT)
        closed = not await sa.receive_nothing(timeout=0.2)
        await sa.disconnect()
        await sb.disconnect()
        return ra, rb, closed

    ra, rb, closed = async_to_sync(run)()
    assert ra["type"] == "error" and ra["error"]
    assert rb["type"] == "pong"
    assert not closed
    assert Host.objects.get(name="kvm-02").last_ping > stale


@pytest.mark.django_db(transaction=True)
def test_r31_ws_message_over_the_limit_gets_an_error(client, agent_key):
    """Issue 8 item 4: a message over the 4 MiB limit is answered with an error (not
    dropped silently) and the socket stays usable."""
    token = enrol(client, agent_key)["token"]
    huge = json.dumps({"type": "ping", "vms": [], "pad": "x" * (4 * 1024 * 1024)})

    async def run():
        s = _ws(token)
        assert (await s.connect(timeout=TIMEOUT))[0]
        await s.send_to(text_data=huge)
        first = await s.receive_json_from(timeout=TIMEOUT)
        await s.send_to(text_data=json.dumps({"type": "ping", "vms": []}))
        second = await s.receive_json_from(timeout=TIMEOUT)
        await s.disconnect()
        return first, second

    first, second = async_to_sync(run)()
    assert first["type"] == "error" and "too large" in first["error"]
    assert second["type"] == "pong"


# --- refused before the body is read (AgentGate) ------------------------------------


def test_r31_early_refusal_rules_need_only_the_headers(agent_key):
    """Issue 8 item 4: what an HTTP server can refuse as soon as an agent request's
    headers are in — no database, no body: the length, no Bearer credentials, the join
    key anywhere but connect. Anything else is left to AgentGate and the view."""
    from hosts.agent.asgi import early_refusal

    bearer = [("Authorization", "Bearer some-token")]
    assert early_refusal(PING, [("Content-Length", "5242880"), *bearer])[0] == 413
    assert early_refusal(PING, [("Content-Length", "12x"), *bearer])[0] == 400
    assert early_refusal(PING, [("Content-Length", "10")])[0] == 401
    assert early_refusal(PING, [(b"authorization", b"Basic eDp5")])[0] == 401
    join = [("authorization", f"Bearer {agent_key}")]
    assert early_refusal(PING, join)[0] == 401
    assert early_refusal(DISCONNECT, join)[0] == 401
    assert early_refusal(CONNECT, join) is None
    assert early_refusal(PING, [("Content-Length", "4194304"), *bearer]) is None
    assert early_refusal("/api/v1/vms", []) is None  # not an agent path
    assert early_refusal(PING, [], method="GET") is None  # the view answers 405


def _gate_call(path: str, headers: list[tuple[bytes, bytes]], body: bytes = b""):
    """Run one HTTP request through AgentGate(Django); returns (status, json, how many
    times the body was asked for)."""
    from django.core.asgi import get_asgi_application

    from hosts.agent.asgi import AgentGate

    app = AgentGate(get_asgi_application())
    reads = 0
    sent: list[dict] = []

    async def receive():
        nonlocal reads
        reads += 1
        if reads > 1:  # after the body, a client only ever disconnects
            await asyncio.sleep(3600)
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "server": ("testserver", 80),
             "client": ("127.0.0.1", 50000),
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode()), *headers]}
    async_to_sync(app)(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(data), reads, dict(start["headers"])


@pytest.mark.django_db(transaction=True)
def test_r31_bad_credentials_and_oversized_bodies_refused_before_the_body_is_read(
        client, agent_key):
    """Issue 8 item 4: under ASGI (where Django reads a body before any view), a request
    without valid credentials is 401 and one whose Content-Length is over the limit is
    413 — the body is never read; a good one goes through."""
    token = enrol(client, agent_key)["token"]
    payload = json.dumps({"vms": []}).encode()
    for path, headers in [
        (PING, []),
        (PING, [(b"authorization", b"Bearer not-a-token")]),
        (PING, [(b"authorization", f"Bearer {agent_key}".encode())]),  # join key: connect only
        (CONNECT, [(b"authorization", b"Bearer not-a-token")]),
        (DISCONNECT, [(b"authorization", b"Basic eDp5")]),
    ]:
        status, data, reads, hdrs = _gate_call(path, headers, payload)
        assert (status, reads) == (401, 0), (path, headers, data)
        assert data["error"] and hdrs[b"www-authenticate"].startswith(b"Bearer")
    big = [(b"authorization", f"Bearer {token}".encode())]
    # Content-Length says 5 MiB (nothing sent yet): refused from the header alone.
    from django.core.asgi import get_asgi_application

    from hosts.agent.asgi import AgentGate as Gate

    app, reads, sent = Gate(get_asgi_application()), [], []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": PING, "raw_path": PING.encode(),
             "query_string": b"", "headers": [*big, (b"content-length", b"5242880")],
             "server": ("testserver", 80), "scheme": "http", "root_path": ""}
    async_to_sync(app)(scope, receive, send)
    assert sent[0]["status"] == 413 and not reads
    assert "too large" in json.loads(sent[1]["body"])["error"]
    # A good ping passes the gate.
    status, data, reads_ok, _ = _gate_call(PING, big, payload)
    assert status == 200 and data == {"ping_interval": 10} and reads_ok >= 1
