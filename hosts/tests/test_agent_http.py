"""HttpAgentClient against a real HTTP agent (hosts/tests/agent_server.py), PROTOCOL.md.

Credentials design (documented in hosts/agent_http.py): an agent that refuses our
token (401/403) raises ``AgentAuthError``, a subclass of ``Unreachable`` — the host
cannot be asked anything — and ``check_health`` is False.
"""

from __future__ import annotations

import contextlib
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from hosts.agent_http import AgentAuthError, HttpAgentClient
from hosts.models import Host
from hosts.tests.agent_server import FakeAgent, agent
from hosts.transport import AgentError, Unreachable
from vms.models import VMInstance


@pytest.fixture
def client():
    c = HttpAgentClient(connect_timeout=1.0, read_timeout=2.0, action_timeout=5.0)
    yield c
    c.close()


@pytest.fixture
def stack():
    with contextlib.ExitStack() as s:
        yield s


def make_host(name: str = "kvm-01", address: str = "10.0.0.11") -> Host:
    """An unsaved host with its server token (what ``connect`` issued; R30)."""
    return Host(name=name, private_ip_address=address, server_token=Host.new_secret())


def serve(stack: contextlib.ExitStack, host: Host, token: str | None = None) -> FakeAgent:
    """Start an agent for ``host`` (accepting ``token``, default the host's own)."""
    fake = stack.enter_context(agent(host.name, token or host.server_token))
    host.agent_url = fake.url + "/"  # a trailing slash must not matter
    return fake


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- check-health ------------------------------------------------------------------

def test_check_health_ok_sends_token_and_empty_body(client, stack):
    host = make_host()
    fake = serve(stack, host)
    assert client.check_health(host) is True
    seen = fake.seen[-1]
    assert (seen.method, seen.path, seen.body) == ("POST", "/check-health", {})
    assert seen.authorization == f"Bearer {host.server_token}"  # R30: the server's own


def test_check_health_false_when_agent_down_and_true_when_back(client, stack):
    host = make_host()
    fake = serve(stack, host)
    assert client.check_health(host) is True  # leaves a keep-alive connection pooled
    fake.down()
    assert client.check_health(host) is False  # connection refused
    fake.up()
    assert client.check_health(host) is True


def test_check_health_false_when_nothing_listens(client):
    host = make_host()
    host.agent_url = f"http://127.0.0.1:{free_port()}"
    assert client.check_health(host) is False


def test_check_health_false_on_timeout(stack):
    host = make_host()
    fake = serve(stack, host)
    fake.delay = 2.0
    with HttpAgentClient(connect_timeout=0.5, read_timeout=0.3) as quick:
        started = time.monotonic()
        assert quick.check_health(host) is False
        assert time.monotonic() - started < 1.5
        with pytest.raises(Unreachable):
            quick.get_vm(host, "i-2-10-VM")


def test_empty_or_bad_agent_url_is_unreachable(client):
    host = make_host()
    host.agent_url = ""
    assert client.check_health(host) is False
    with pytest.raises(Unreachable):
        client.get_vm(host, "x")
    host.agent_url = "not a url"
    with pytest.raises(Unreachable):
        client.get_vm(host, "x")


def test_check_health_requires_ok_true(client, stack):
    host = make_host()
    fake = serve(stack, host)
    fake.raw(200, "<html>some other server</html>")
    assert client.check_health(host) is False
    fake.raw(200, '{"ok": false}', "application/json")
    assert client.check_health(host) is False


# --- get_vm ------------------------------------------------------------------------

def test_get_vm_power_states_and_unknown(client, stack):
    host = make_host()
    fake = serve(stack, host)
    fake.add_vm("i-2-10-VM", "PowerOn")
    fake.add_vm("i-2-11-VM", "PowerOff")
    assert client.get_vm(host, "i-2-10-VM") == "PowerOn"
    assert client.get_vm(host, "i-2-11-VM") == "PowerOff"
    assert client.get_vm(host, "i-2-12-VM") is None
    assert fake.seen[0].path == "/vms/i-2-10-VM"
    # Sequential calls reuse one keep-alive connection.
    assert len({s.client_port for s in fake.seen}) == 1


def test_get_vm_404_that_is_not_the_protocol_is_not_unknown(client, stack):
    host = make_host()
    fake = serve(stack, host)
    fake.raw(404, "<html>Not Found</html>")
    with pytest.raises(Unreachable):
        client.get_vm(host, "i-2-10-VM")


def test_get_vm_quotes_the_name(client, stack):
    host = make_host()
    fake = serve(stack, host)
    fake.add_vm("web 1/a?b", "PowerOn")
    assert client.get_vm(host, "web 1/a?b") == "PowerOn"
    assert fake.seen[-1].path == "/vms/web%201%2Fa%3Fb"


def test_5xx_without_json_is_unreachable_with_json_is_agent_error(client, stack):
    host = make_host()
    fake = serve(stack, host)
    fake.raw(503, "<html>Service Unavailable</html>")
    with pytest.raises(Unreachable):
        client.get_vm(host, "i-2-10-VM")
    fake.raw(500, '{"error": "libvirt: connection lost"}', "application/json")
    with pytest.raises(AgentError) as exc:
        client.get_vm(host, "i-2-10-VM")
    assert exc.value.status == 500
    assert str(exc.value) == "libvirt: connection lost"


def test_2xx_outside_protocol_is_agent_error(client, stack):
    host = make_host()
    fake = serve(stack, host)
    fake.raw(200, "plain text")
    with pytest.raises(AgentError):
        client.get_vm(host, "i-2-10-VM")
    fake.raw(200, '{"name": "i-2-10-VM"}', "application/json")
    with pytest.raises(AgentError):
        client.get_vm(host, "i-2-10-VM")


# --- start / stop ------------------------------------------------------------------

def test_start_vm_sends_size_and_starts(client, stack):
    host = make_host()
    fake = serve(stack, host)
    vm = VMInstance(name="i-2-10-VM", cpus=2, memory_mb=4096)
    client.start_vm(host, vm)
    seen = fake.seen[-1]
    assert (seen.method, seen.path) == ("POST", "/vms/i-2-10-VM/start")
    assert seen.body == {"cpus": 2, "memory_mb": 4096}
    assert client.get_vm(host, "i-2-10-VM") == "PowerOn"


@pytest.mark.parametrize("status", [409, 500])
def test_start_vm_refused_is_agent_error_with_message(client, stack, status):
    host = make_host()
    fake = serve(stack, host)
    fake.fail_starts(1, status=status, message="insufficient memory on kvm-01")
    vm = VMInstance(name="i-2-10-VM", cpus=2, memory_mb=4096)
    with pytest.raises(AgentError) as exc:
        client.start_vm(host, vm)
    assert str(exc.value) == "insufficient memory on kvm-01"
    assert exc.value.status == status
    assert not isinstance(exc.value, Unreachable)
    assert client.get_vm(host, vm.name) is None  # a refused request changes nothing
    client.start_vm(host, vm)  # the knob was for one start only
    assert client.get_vm(host, vm.name) == "PowerOn"


def test_start_vm_down_is_unreachable(client, stack):
    host = make_host()
    fake = serve(stack, host)
    fake.down()
    with pytest.raises(Unreachable):
        client.start_vm(host, VMInstance(name="i-2-10-VM"))


def test_stop_vm_forgets_the_vm(client, stack):
    host = make_host()
    fake = serve(stack, host)
    fake.add_vm("i-2-10-VM", "PowerOn")
    fake.add_vm("i-2-11-VM", "PowerOff")
    client.stop_vm(host, "i-2-10-VM")
    assert fake.seen[-1].body == {"force": True}
    assert fake.seen[-1].path == "/vms/i-2-10-VM/stop"
    assert client.get_vm(host, "i-2-10-VM") is None
    client.stop_vm(host, "i-2-11-VM", force=False)
    assert fake.seen[-1].body == {"force": False}
    assert client.get_vm(host, "i-2-11-VM") is None
    # Already forgotten: the agent's 404 means there is nothing left to stop.
    client.stop_vm(host, "i-2-10-VM")


# --- migrate -----------------------------------------------------------------------

def test_migrate_vm_returns_target_name(client, stack):
    source, target = make_host("kvm-01"), make_host("kvm-02", "10.0.0.12")
    src, dst = serve(stack, source), serve(stack, target)
    src.add_vm("i-2-10-VM", "PowerOn")
    assert client.migrate_vm(source, "i-2-10-VM", target) == "kvm-02"
    assert src.seen[-1].body == {"target_url": target.agent_url}
    assert client.get_vm(source, "i-2-10-VM") is None
    assert client.get_vm(target, "i-2-10-VM") == "PowerOn"
    assert dst.vms["i-2-10-VM"]["power_state"] == "PowerOn"


def test_migrate_vm_refused(client, stack):
    source, target = make_host("kvm-01"), make_host("kvm-02", "10.0.0.12")
    src = serve(stack, source)
    target.agent_url = f"http://127.0.0.1:{free_port()}"  # no agent there
    src.add_vm("i-2-10-VM", "PowerOn")
    with pytest.raises(AgentError) as exc:
        client.migrate_vm(source, "i-2-10-VM", target)
    assert exc.value.status == 409
    assert "migration target" in str(exc.value)
    assert client.get_vm(source, "i-2-10-VM") == "PowerOn"


# --- check-on-host -----------------------------------------------------------------

def test_check_on_host_true_false_none(client, stack):
    neighbour = make_host("kvm-01")
    fake = serve(stack, neighbour)
    fake.peers.update({"kvm-02": True, "kvm-03": False, "kvm-04": None})
    assert client.check_on_host(neighbour, make_host("kvm-02", "10.0.0.12")) is True
    assert fake.seen[-1].body == {"name": "kvm-02", "address": "10.0.0.12"}
    assert fake.seen[-1].path == "/check-on-host"
    assert client.check_on_host(neighbour, make_host("kvm-03", "10.0.0.13")) is False
    assert client.check_on_host(neighbour, make_host("kvm-04", "10.0.0.14")) is None
    assert client.check_on_host(neighbour, make_host("kvm-05", "10.0.0.15")) is None


def test_check_on_host_neighbour_down_is_unreachable(client, stack):
    neighbour = make_host("kvm-01")
    fake = serve(stack, neighbour)
    fake.down()
    with pytest.raises(Unreachable):
        client.check_on_host(neighbour, make_host("kvm-02"))


# --- credentials -------------------------------------------------------------------

def test_wrong_token_is_agent_auth_error_a_kind_of_unreachable(client, stack):
    host = make_host()
    fake = serve(stack, host, token="some-other-token")
    fake.add_vm("i-2-10-VM", "PowerOn")
    assert client.check_health(host) is False
    with pytest.raises(AgentAuthError) as exc:
        client.get_vm(host, "i-2-10-VM")
    assert isinstance(exc.value, Unreachable)
    assert exc.value.status == 401
    assert "wrong token" in str(exc.value)
    with pytest.raises(Unreachable):
        client.stop_vm(host, "i-2-10-VM")
    with pytest.raises(Unreachable):
        client.start_vm(host, VMInstance(name="i-2-11-VM"))
    assert set(fake.vms) == {"i-2-10-VM"}  # nothing written


def test_replaced_server_token_is_refused(client, stack):
    host = make_host()
    serve(stack, host)
    host.server_token = Host.new_secret()  # re-enrolled elsewhere; this agent kept the old
    assert client.check_health(host) is False


# --- with hosts from the database, and shared across threads ------------------------

@pytest.mark.django_db
def test_saved_hosts_and_concurrent_calls(client, stack):
    Host.objects.create(name="kvm-01", private_ip_address="10.0.0.11",
                        server_token=Host.new_secret())
    Host.objects.create(name="kvm-02", private_ip_address="10.0.0.12",
                        server_token=Host.new_secret())
    h1, h2 = Host.objects.get(name="kvm-01"), Host.objects.get(name="kvm-02")
    a1, a2 = serve(stack, h1), serve(stack, h2)
    Host.objects.filter(pk=h1.pk).update(agent_url=h1.agent_url)
    Host.objects.filter(pk=h2.pk).update(agent_url=h2.agent_url)
    h1, h2 = Host.objects.get(name="kvm-01"), Host.objects.get(name="kvm-02")
    a1.peers["kvm-02"] = True

    def work(i: int):
        host = (h1, h2)[i % 2]
        name = f"i-2-{i}-VM"
        client.start_vm(host, VMInstance(name=name, cpus=1, memory_mb=512))
        return client.check_health(host), client.get_vm(host, name)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, range(24)))
    assert results == [(True, "PowerOn")] * 24
    assert len(a1.vms) == len(a2.vms) == 12
    assert client.check_on_host(h1, h2) is True
