"""(c) hadash-agent against the real hadash server: a real daphne on a fresh database,
agents as real processes on libvirt test-driver hosts, HTTP and websockets only
(PROTOCOL.md v1.1: Authentication, connect, ping, websocket transport, Server → agent;
SPEC R1, R6, R8, R29). The engine is not started: nothing here needs HA."""

from __future__ import annotations

import json
import os
import secrets
import time

import httpx
import pytest
from agenttest import AgentProcess, Dom, agent_env, write_node

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PING_INTERVAL = 60  # long: whatever the server learns within seconds was pushed


class Hadash:
    """A real daphne serving hadash on a fresh database."""

    def __init__(self, sup, env, port):
        self.sup, self.env, self.port = sup, env, port
        self.url = f"http://127.0.0.1:{port}"
        self.web = None
        self.api: httpx.Client | None = None

    def start(self):
        from hadash.supervisor import wait_for_port

        self.web = self.sup.python("web", "-m", "daphne", "-b", "127.0.0.1", "-p",
                                   str(self.port), "hadash.asgi:application")
        wait_for_port(self.port, proc=self.web.proc, timeout=60)

    def stop_web(self):
        import signal

        os.killpg(self.web.proc.pid, signal.SIGKILL)
        self.web.proc.wait(timeout=10)

    def host(self, name: str) -> dict | None:
        r = self.api.get(f"/hosts/{name}")
        return r.json() if r.status_code == 200 else None

    def vm(self, name: str) -> dict:
        r = self.api.get(f"/vms/{name}")
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture(scope="module")
def hadash(tmp_path_factory):
    from hadash.supervisor import Supervisor, free_port
    from tests.conftest import fresh_database, manage

    var = tmp_path_factory.mktemp("hadash")
    with fresh_database(var, "agent") as url:
        env = {**os.environ, "DATABASE_URL": url, "HADASH_VAR_DIR": str(var),
               "SECRET_KEY": secrets.token_urlsafe(40),
               "HADASH_AGENT_KEY": secrets.token_urlsafe(24),
               "HADASH_AGENT_NETWORKS": "127.0.0.0/8", "HADASH_LOG": "INFO"}
        env.pop("DEBUG", None)
        env.pop("CI", None)
        manage(env, "migrate", "--noinput", "-v0")
        token = manage(env, "apitoken", "e2e", "--create").strip().splitlines()[-1]
        sup = Supervisor(echo=bool(os.environ.get("HADASH_E2E_ECHO")), grace=8.0, base_env=env)
        server = Hadash(sup, env, free_port())
        server.api = httpx.Client(base_url=f"{server.url}/api/v1", timeout=15,
                                  headers={"Authorization": f"Bearer {token}"})
        try:
            server.start()
            r = server.api.put("/config/ping.interval", json={"value": str(PING_INTERVAL)})
            assert r.status_code == 200, r.text
            yield server
        except BaseException:
            for c in sup.children:
                print(f"---- {c.name} (last lines)\n" + "\n".join(c.log[-60:]))
            raise
        finally:
            sup.stop()
            server.api.close()
            assert sup.leftovers() == [], "processes left running after stop"


@pytest.fixture
def real_agent(hadash, tmp_path, supervisor):
    """``real_agent(name, domains, join_key=True, state_dir=None, **settings)``: an
    agent process (not started) for the real server, test hooks on."""
    from hadash.supervisor import free_port

    def make(name, domains=(), *, join_key=True, state_dir=None, **settings):
        base = tmp_path / f"{name}-{secrets.token_hex(3)}"
        base.mkdir()
        uri = write_node(base / "node.xml", domains)
        port = free_port()
        state_dir = state_dir or base / "state"
        if join_key:
            settings["join_key"] = hadash.env["HADASH_AGENT_KEY"]
        env = agent_env(server_url=hadash.url, libvirt_uri=uri, port=port,
                        state_dir=state_dir, name=name, test_hooks="1", **settings)
        agent = AgentProcess(supervisor, name, env, port, state_dir)
        agent.disk_dir = base
        return agent

    return make


def wait_until(what, cond, timeout=15.0, every=0.05):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def register(hadash, vm: str, host: str) -> None:
    r = hadash.api.post("/vms", json={"name": vm, "host": host, "cpus": 1, "memory_mb": 64,
                                      "ha_enabled": False, "priority": "medium"})
    assert r.status_code == 201, r.text


def test_enrol_report_and_lifecycle_push(hadash, real_agent):
    """Enrolment with the join key (R29) brings the host Up (R1) with its credentials
    saved privately; a domain stopped behind hadash's back is reported at once (a
    libvirt event, not the 60 s ping) — PowerOff on the server within a second or so
    (R8); the operator's start goes through the server to the agent (server_token)."""
    agent = real_agent("kvm-e1", [Dom("web-e1"), Dom("db-e1", running=False)]).start()
    agent.wait_log("enrolled with the join key as host kvm-e1", timeout=30)
    host = wait_until("kvm-e1 Up", lambda: (h := hadash.host("kvm-e1")) and
                      h["status"] == "Up" and h)
    assert host["cpus"] == 8 and host["memory_mb"] == 16 * 1024
    creds = agent.credentials()
    assert creds["token"] and creds["server_token"]
    assert (agent.state_dir / "state.json").stat().st_mode & 0o777 == 0o600
    # v1.1: the server's credential is its own, not the host token.
    assert creds["server_token"] != creds["token"]

    register(hadash, "web-e1", "kvm-e1")
    register(hadash, "db-e1", "kvm-e1")
    # The next report (pushed by the hooks below) tells the server the power states.
    with agent.client() as c:
        assert c.post("/test/destroy/web-e1").status_code == 200
        t0 = time.monotonic()
    wait_until("web-e1 PowerOff on the server", lambda: hadash.vm("web-e1")["power_state"]
               == "PowerOff", timeout=5)
    took = time.monotonic() - t0
    print(f"lifecycle push: destroy → PowerOff on the server in {took:.2f} s")
    assert took < PING_INTERVAL / 4  # only the event can explain it
    assert hadash.vm("db-e1")["power_state"] == "PowerOff"
    assert agent.log and not any("Traceback" in line for line in agent.log)

    # Server → agent with the real server's credential: the operator starts db-e1.
    r = hadash.api.post("/vms/db-e1/start")
    assert r.status_code == 200, r.text
    with agent.client() as c:
        assert c.get("/vms/db-e1").json()["power_state"] == "PowerOn"
    wait_until("db-e1 PowerOn on the server",
               lambda: hadash.vm("db-e1")["power_state"] == "PowerOn", timeout=5)


def test_reconnect_with_the_stored_token_after_a_restart(hadash, real_agent):
    """R6/R29: a restarted agent connects with its own token (no join key needed) and
    keeps its row; the join key naming the enrolled host is refused (409) and a token
    the server does not know is refused (401), each logged as what to do."""
    first = real_agent("kvm-e2", [Dom("web-e2")])
    first.start()
    first.wait_log("enrolled with the join key as host kvm-e2", timeout=30)
    creds = first.credentials()
    assert first.stop() == 0

    again = real_agent("kvm-e2", [Dom("web-e2")], join_key=False, state_dir=first.state_dir)
    again.start()
    again.wait_log("connected as host kvm-e2", timeout=30)
    assert not any("enrolled with the join key" in line for line in again.log)
    assert again.credentials()["token"] == creds["token"]  # a reconnect does not rotate it
    names = [h["name"] for h in hadash.api.get("/hosts").json()]
    assert names.count("kvm-e2") == 1
    wait_until("kvm-e2 Up", lambda: hadash.host("kvm-e2")["status"] == "Up")

    # Someone else with the join key and the same name: refused, nothing taken over.
    intruder = real_agent("kvm-e2", [])
    intruder.start()
    intruder.wait_log("ask an operator to re-enrol this host", timeout=30)
    assert "409" in intruder.wait_log("enrolment of kvm-e2 refused")
    assert not (intruder.state_dir / "state.json").exists()
    # …while the real agent keeps reporting with its token.
    register(hadash, "web-e2", "kvm-e2")
    with again.client() as c:
        assert c.post("/test/destroy/web-e2").status_code == 200
    wait_until("web-e2 PowerOff", lambda: hadash.vm("web-e2")["power_state"] == "PowerOff",
               timeout=5)

    # A token the server does not know, and no join key: refused, retried slowly.
    stale = real_agent("kvm-e2", [], join_key=False)
    stale.state_dir.mkdir(mode=0o700)
    (stale.state_dir / "state.json").write_text(json.dumps({
        "name": "kvm-e2", "server_url": hadash.url, "token": "not-a-real-token",
        "server_token": "x"}))
    stale.start()
    stale.wait_log("token refused: ask an operator to re-enrol this host", timeout=30)
    assert again.credentials()["token"] == creds["token"]


def test_keeps_working_through_a_server_restart(hadash, real_agent):
    """Network loss / server restart: the agent backs off, never exits, and reports
    again once the server is back (a websocket, re-opened)."""
    agent = real_agent("kvm-e3", [Dom("web-e3"), Dom("app-e3")])
    agent.start()
    agent.wait_log("enrolled with the join key as host kvm-e3", timeout=30)
    register(hadash, "web-e3", "kvm-e3")
    register(hadash, "app-e3", "kvm-e3")
    hadash.stop_web()
    mark = len(agent.log)
    with agent.client() as c:
        assert c.post("/test/destroy/web-e3").status_code == 200
    agent.wait_log("unreachable", after=mark, timeout=15)
    time.sleep(3)  # a few back-off rounds
    assert agent.child.proc.poll() is None
    hadash.start()
    agent.wait_log("server reachable again", after=mark, timeout=20)
    wait_until("web-e3 PowerOff after the restart",
               lambda: hadash.vm("web-e3")["power_state"] == "PowerOff", timeout=10)
    # And pushes still work over the re-opened socket.
    with agent.client() as c:
        assert c.post("/test/destroy/app-e3").status_code == 200
    wait_until("app-e3 PowerOff", lambda: hadash.vm("app-e3")["power_state"] == "PowerOff",
               timeout=5)
    assert not any("Traceback" in line for line in agent.log)



def test_operator_reenrolment_lets_a_reinstalled_host_take_its_row(hadash, real_agent):
    """R29: a reinstalled host (state lost) is refused (409) until an operator
    re-enrols it; then its next retry with the join key takes the row with new
    credentials, and the old token is refused (401), logged as what to do."""
    old = real_agent("kvm-e4", [Dom("web-e4")])
    old.start()
    old.wait_log("enrolled with the join key as host kvm-e4", timeout=30)
    old_token = old.credentials()["token"]
    assert old.stop() == 0

    new = real_agent("kvm-e4", [Dom("web-e4")])  # same name, empty state directory
    new.start()
    mark = len(new.log)
    new.wait_log("enrolment of kvm-e4 refused: ask an operator to re-enrol this host",
                 timeout=30)
    r = hadash.api.post("/hosts/kvm-e4/reenrol")
    assert r.status_code == 200, r.text
    new.wait_log("enrolled with the join key as host kvm-e4", after=mark, timeout=15)
    assert new.credentials()["token"] != old_token
    assert [h["name"] for h in hadash.api.get("/hosts").json()].count("kvm-e4") == 1

    again = real_agent("kvm-e4", [Dom("web-e4")], join_key=False, state_dir=old.state_dir)
    again.start()
    again.wait_log("token refused: ask an operator to re-enrol this host", timeout=30)


def test_start_from_a_stored_definition_on_another_host(hadash, real_agent):
    """Issue 9 (PROTOCOL.md v1.1): a domain defined only on kvm-e5 is reported as an
    unmanaged VM with the definition the agent sent; the operator adopts it (its size
    read from that definition), it stops behind hadash's back, kvm-e5 is disabled, and
    the operator's start places it on kvm-e6 — whose libvirt never knew it — from the
    stored definition: kvm-e6's libvirt runs it."""
    # A cluster of their own: the module's other hosts (their agents gone, still Up
    # for a ping interval) are no candidates.
    a = real_agent("kvm-e5", [Dom("web-e5")], cluster="defs").start()
    b = real_agent("kvm-e6", [], cluster="defs").start()
    a.wait_log("enrolled with the join key as host kvm-e5", timeout=30)
    b.wait_log("enrolled with the join key as host kvm-e6", timeout=30)
    with b.client() as c:
        assert c.get("/vms/web-e5").status_code == 404  # kvm-e6 does not know it

    def listed():
        rows = hadash.api.get("/unmanaged-vms").json()
        return [u for u in rows if u["name"] == "web-e5"]

    (row,) = wait_until("web-e5 listed as unmanaged", listed, timeout=10)
    assert (row["host"], row["power_state"], row["has_definition"]) == (
        "kvm-e5", "PowerOn", True)
    r = hadash.api.post("/unmanaged-vms/adopt", json={"vms": [
        {"name": "web-e5", "host": "kvm-e5", "ha_enabled": False, "priority": "high"}]})
    assert r.status_code == 201, r.text
    (vm,) = r.json()
    assert (vm["state"], vm["host"], vm["cpus"], vm["memory_mb"]) == (
        "Running", "kvm-e5", 1, 64)
    assert not listed()
    definition = hadash.api.get("/vms/web-e5/definition").json()
    assert definition["host"] == "kvm-e5" and "<name>web-e5</name>" in definition["xml"]

    with a.client() as c:
        assert c.post("/test/destroy/web-e5").status_code == 200
    wait_until("web-e5 Stopped", lambda: hadash.vm("web-e5")["state"] == "Stopped",
               timeout=5)
    assert hadash.api.post("/hosts/kvm-e5/disable").status_code == 200
    r = hadash.api.post("/vms/web-e5/start")
    assert r.status_code == 200, r.text
    assert (r.json()["state"], r.json()["host"]) == ("Running", "kvm-e6")
    with b.client() as c:
        assert c.get("/vms/web-e5").json()["power_state"] == "PowerOn"
    wait_until("web-e5 PowerOn on kvm-e6", lambda: (v := hadash.vm("web-e5"))
               ["power_state"] == "PowerOn" and v["host"] == "kvm-e6", timeout=5)
    assert not any("Traceback" in line for line in a.log + b.log)
