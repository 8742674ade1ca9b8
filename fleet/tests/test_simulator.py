"""The fleet simulator (fleet.simulator, docs/simulator.md).

* Its agent endpoints and Redfish BMCs, driven by the server's real clients
  (``hosts.agent_http.HttpAgentClient``, ``hosts.redfish.RedfishClient``) with unsaved
  ``Host`` rows, the simulator on a background thread (agent loops off, tokens set
  directly);
* its control API and the fault vocabulary (and ``manage.py simulate fault``);
* its agent loops against a small fake hadash server (connect, websocket/HTTP pings on
  a fixed grid, token refused → connect again, faults stop and resume pings);
* end to end (``e2e``): daphne serving hadash on the test database, the simulator as a
  subprocess, hosts Up and VMs registered, checked through the database.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from aiohttp import web
from django.core.management import call_command
from django.core.management.base import CommandError

from fleet.simulator import Options, SimulatorThread, demo_fleet, parse_fault
from fleet.simulator.agents import Grid
from fleet.simulator.server import target_host_name
from fleet.simulator.state import FaultError
from hosts.agent_http import AgentAuthError, HttpAgentClient
from hosts.models import Host
from hosts.redfish import RedfishClient
from hosts.transport import AgentError, Unreachable
from vms.models import VMInstance

ROOT = Path(__file__).resolve().parents[2]
START_DELAY = 0.3
CONTROL_TOKEN = "control-token-of-test-simulator"
CTL = {"Authorization": f"Bearer {CONTROL_TOKEN}"}  # the control API's token


@pytest.fixture(autouse=True)
def _control_token(monkeypatch):
    """Every simulator here (threads, the simulate command, subprocesses) takes this
    control-API token."""
    monkeypatch.setenv("HADASH_FLEET_TOKEN", CONTROL_TOKEN)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


# --- the simulator on a thread, agents off ----------------------------------------


@pytest.fixture
def sim():
    opts = Options(listen_port=0, agents=False, hosts=3, vms=6, start_delay=START_DELAY,
                   status_interval=0, seed=1)
    with SimulatorThread(opts) as st:
        yield st


def host_for(st: SimulatorThread, name: str, *, token: bool = True, **fields) -> Host:
    """An unsaved Host row pointing at the simulated host, with a server token; the
    simulated agent accepts it (as if it had got it from connect: PROTOCOL.md v1.1)."""
    h = Host(
        name=name, agent_url=st.sim.agent_url(name), server_token=Host.new_secret(),
        oobm_enabled=True, oobm_address=st.sim.bmc_url(name), oobm_system_id=name,
        oobm_username="admin", oobm_password="hadash-sim", **fields,
    )
    if token:
        st.call(setattr, st.sim.fleet.hosts[name], "server_token", h.server_token)
    return h


def fault(st: SimulatorThread, do: str) -> httpx.Response:
    return httpx.post(f"{st.url}/control/faults", json={"do": do}, headers=CTL, timeout=5)


def vms_of(st: SimulatorThread, name: str) -> dict[str, str]:
    return st.call(lambda: dict(st.sim.fleet.hosts[name].vms))


@pytest.fixture
def agents():
    with HttpAgentClient(read_timeout=3, action_timeout=10) as client:
        yield client


@pytest.fixture
def bmc():
    with RedfishClient(confirm_timeout=3, poll_interval=0.05) as client:
        yield client


def test_demo_fleet_shape():
    fleet = demo_fleet(hosts=4, vms=10, ha_ratio=0.5, clusters=2, seed=3)
    assert list(fleet.hosts) == ["kvm-001", "kvm-002", "kvm-003", "kvm-004"]
    assert [h.cluster for h in fleet.hosts.values()] == ["c1", "c2", "c1", "c2"]
    assert list(fleet.vm_specs)[:2] == ["vm-0001", "vm-0002"]
    assert fleet.hosts["kvm-001"].vms == {"vm-0001": "PowerOn", "vm-0005": "PowerOn",
                                          "vm-0009": "PowerOn"}
    assert sum(s.ha_enabled for s in fleet.vm_specs.values()) == 5
    assert all(s.cpus in (1, 2) and 1024 <= s.memory_mb <= 4096
               for s in fleet.vm_specs.values())
    assert len(demo_fleet(hosts=1000, vms=1).hosts) == 1000
    assert "kvm-0001" in demo_fleet(hosts=1000, vms=0).hosts


def test_every_demo_host_has_an_address_the_server_accepts():
    """Issue 12: host 256 of a fleet had "10.0.0.256", its connect was a 400, and a
    1,000-host bench waited for three hosts (256, 512, 768) that never enrolled."""
    from hosts.agent.networks import address_problem

    hosts = demo_fleet(hosts=1000, vms=0).hosts.values()
    addresses = [h.address for h in hosts]
    assert addresses[:2] == ["10.0.0.1", "10.0.0.2"]
    assert len(set(addresses)) == 1000
    assert [a for a in addresses if address_problem(a, resolve=False)] == []


def test_fault_parsing():
    assert parse_fault("host  kvm-001 power off").what == "power off"
    assert parse_fault("host kvm-001 start-fail 3").count == 3
    assert parse_fault("bmc kvm-001 fail").kind == "bmc"
    assert parse_fault("vm vm-0001 vanish").kind == "vm"
    for bad in ("host kvm-001 explode", "vm vm-1 stop", "host kvm-001 disable", "config x 1",
                "", "bmc kvm-001"):
        with pytest.raises(FaultError):
            parse_fault(bad)


def test_grid_keeps_its_rhythm_and_skips_missed_slots():
    async def run():
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        grid = Grid(0.05, t0)
        slots = []
        for k in range(6):
            if k == 3:
                time.sleep(0.12)  # the loop is blocked for more than two slots
            slot = grid.next
            late = await grid.wait()
            slots.append(((slot - t0) / 0.05, late))
            missed.append(grid.missed)
        return slots

    missed: list[list[float]] = []
    slots = asyncio.run(run())
    # Every ping is served on the grid t0 + k × 0.05 (no drift); after the blocked
    # stretch the late slot is served once and the missed one skipped, not made up.
    ks = [round(k, 6) for k, _ in slots]
    assert all(k == int(k) for k in ks), ks
    assert ks[:4] == [0, 1, 2, 3] and ks[4] >= 5 and ks[5] == ks[4] + 1, ks
    assert slots[3][1] > 0.05
    # The skipped slots count as late too (no coordinated omission), each by its own
    # lateness: one slot fewer than the served one.
    skipped = int(round(slots[4][0])) - 4
    assert [len(m) for m in missed] == [0, 0, 0, skipped, 0, 0]
    assert all(0 < m < slots[3][1] for m in missed[3])


def test_agent_health_get_vm_and_tokens(sim, agents):
    """R30: the simulated agents check the server_token the server presents."""
    h1 = host_for(sim, "kvm-001")
    assert agents.check_health(h1) is True
    assert agents.get_vm(h1, "vm-0001") == "PowerOn"
    assert agents.get_vm(h1, "vm-0002") is None  # lives on kvm-002
    # A token the agent did not get from connect is refused (401 → AgentAuthError).
    stranger = host_for(sim, "kvm-002", token=False)
    assert agents.check_health(stranger) is False
    with pytest.raises(AgentAuthError):
        agents.get_vm(stranger, "vm-0002")
    # The agent's own token is not the server's credential.
    host_for(sim, "kvm-002")
    sim.call(setattr, sim.sim.fleet.hosts["kvm-002"], "token", "agent-own-token")
    r = httpx.post(f"{sim.url}/agents/kvm-002/check-health", json={},
                   headers={"Authorization": "Bearer agent-own-token"}, timeout=5)
    assert r.status_code == 401 and "server token" in r.json()["error"]
    # An agent that has not connected yet accepts no token at all.
    assert agents.check_health(host_for(sim, "kvm-003", token=False)) is False


def test_start_takes_the_configured_time_and_shows_as_starting(sim, agents):
    sim.call(setattr, sim.sim.opts, "start_delay", 1.0)  # a window wide enough to look
    h1 = host_for(sim, "kvm-001")
    vm = VMInstance(name="web-1", cpus=2, memory_mb=4096)
    done = threading.Event()
    errors: list[BaseException] = []

    def start():
        try:
            agents.start_vm(h1, vm)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        done.set()

    t0 = time.monotonic()
    threading.Thread(target=start, daemon=True).start()
    view = wait_for(lambda: (r := httpx.get(f"{sim.url}/control/hosts/kvm-001", headers=CTL).json())
                    and "web-1" in r["starting"] and r, what="web-1 starting")
    assert "web-1" not in {v["name"] for v in view["vms"]}
    assert done.wait(5) and not errors
    assert time.monotonic() - t0 >= 1.0
    assert agents.get_vm(h1, "web-1") == "PowerOn"
    assert httpx.get(f"{sim.url}/control/hosts/kvm-001", headers=CTL).json()["starting"] == []


def test_start_fail_n(sim, agents):
    h1 = host_for(sim, "kvm-001")
    assert fault(sim, "host kvm-001 start-fail 2").status_code == 200
    for _ in range(2):
        with pytest.raises(AgentError) as info:
            agents.start_vm(h1, VMInstance(name="db-1", cpus=1, memory_mb=1024))
        assert info.value.status == 500
        assert "injected" in str(info.value)
    assert agents.get_vm(h1, "db-1") is None
    agents.start_vm(h1, VMInstance(name="db-1", cpus=1, memory_mb=1024))
    assert agents.get_vm(h1, "db-1") == "PowerOn"


def test_stop_forgets_the_vm(sim, agents):
    h1 = host_for(sim, "kvm-001")
    agents.stop_vm(h1, "vm-0001")
    assert agents.get_vm(h1, "vm-0001") is None
    assert "vm-0001" not in vms_of(sim, "kvm-001")
    agents.stop_vm(h1, "vm-0001")  # unknown there: nothing to stop, not an error


def test_migrate_moves_the_vm(sim, agents):
    h1, h2 = host_for(sim, "kvm-001"), host_for(sim, "kvm-002")
    assert agents.migrate_vm(h1, "vm-0001", h2) == "kvm-002"
    assert "vm-0001" not in vms_of(sim, "kvm-001")
    assert vms_of(sim, "kvm-002")["vm-0001"] == "PowerOn"
    with pytest.raises(AgentError) as info:
        agents.migrate_vm(h1, "vm-0001", h2)  # no longer runs on kvm-001
    assert info.value.status == 409
    fault(sim, "host kvm-003 power off")
    with pytest.raises(AgentError):
        agents.migrate_vm(h2, "vm-0001", host_for(sim, "kvm-003", token=False))
    assert target_host_name("http://127.0.0.1:9100/agents/kvm-007/") == "kvm-007"
    assert target_host_name("http://127.0.0.1:9100/other/kvm-007") is None


def test_check_on_host_sees_the_machine_not_its_agent(sim, agents):
    h1 = host_for(sim, "kvm-001")
    h2 = Host(name="kvm-002", private_ip_address="10.0.0.2")
    assert agents.check_on_host(h1, h2) is True
    fault(sim, "host kvm-002 agent stop")
    assert agents.check_on_host(h1, h2) is True
    fault(sim, "host kvm-002 network off")
    assert agents.check_on_host(h1, h2) is True
    fault(sim, "host kvm-002 power off")
    assert agents.check_on_host(h1, h2) is False
    assert agents.check_on_host(h1, Host(name="elsewhere")) is None


@pytest.mark.parametrize("down, up", [
    ("host kvm-001 power off", "host kvm-001 power on"),
    ("host kvm-001 agent stop", "host kvm-001 agent start"),
    ("host kvm-001 network off", "host kvm-001 network on"),
])
def test_unreachable_agent_answers_nothing(sim, agents, down, up):
    h1 = host_for(sim, "kvm-001")
    assert fault(sim, down).status_code == 200
    assert agents.check_health(h1) is False
    with pytest.raises(Unreachable) as info:
        agents.get_vm(h1, "vm-0001")
    assert not isinstance(info.value, AgentAuthError)  # no answer at all, not a 401
    with pytest.raises(Unreachable):
        agents.start_vm(h1, VMInstance(name="x", cpus=1, memory_mb=1))
    with pytest.raises(Unreachable):
        agents.check_on_host(h1, Host(name="kvm-002"))
    assert fault(sim, up).status_code == 200
    assert agents.check_health(h1) is True
    # Only a power cycle kills the VMs.
    expected = None if "power" in down else "PowerOn"
    assert agents.get_vm(h1, "vm-0001") == expected


def test_start_on_a_host_that_dies_meanwhile_gets_no_answer(sim, agents):
    sim.call(setattr, sim.sim.opts, "start_delay", 5.0)
    h1 = host_for(sim, "kvm-001")
    result: list = []

    def start():
        try:
            agents.start_vm(h1, VMInstance(name="late", cpus=1, memory_mb=1024))
            result.append("started")
        except Unreachable:
            result.append("unreachable")

    t = threading.Thread(target=start, daemon=True)
    t.start()
    wait_for(lambda: "late" in httpx.get(f"{sim.url}/control/hosts/kvm-001",
                                         headers=CTL).json()["starting"])
    t0 = time.monotonic()
    fault(sim, "host kvm-001 power off")
    t.join(5)
    assert result == ["unreachable"]
    assert time.monotonic() - t0 < 2.0  # the connection dropped with the machine
    assert vms_of(sim, "kvm-001") == {}


def test_unknown_host_answers_nothing(sim, agents):
    ghost = Host(name="kvm-404", agent_url=f"{sim.url}/agents/kvm-404",
                 server_token=Host.new_secret())
    assert agents.check_health(ghost) is False
    with pytest.raises(Unreachable):
        agents.get_vm(ghost, "vm-0001")


def test_redfish_power_state_and_reset(sim, bmc, agents):
    h1 = host_for(sim, "kvm-001")
    assert bmc.power_state(h1) == "On"
    fault(sim, "host kvm-001 agent stop")
    assert bmc.power_state(h1) == "On"  # the machine runs; only its agent stopped
    fault(sim, "host kvm-001 agent start")
    # Fencing: ForceOff, confirmed Off; the machine's VMs die with it.
    assert bmc.power_off(h1) is True
    assert bmc.power_state(h1) == "Off"
    view = httpx.get(f"{sim.url}/control/hosts/kvm-001", headers=CTL).json()
    assert view["powered"] is False and view["vms"] == []
    assert agents.check_health(h1) is False
    assert bmc.power_off(h1) is True  # already off
    assert bmc.power_on(h1, wait=True) is True
    assert bmc.power_state(h1) == "On"
    assert agents.check_health(h1) is True
    assert vms_of(sim, "kvm-001") == {}  # it boots with no VM powered on


def test_redfish_bmc_fail_and_credentials(sim, bmc):
    h2 = host_for(sim, "kvm-002")
    fault(sim, "host kvm-002 power off")
    assert bmc.power_state(h2) == "Off"  # the BMC answers for a powered-off machine
    fault(sim, "bmc kvm-002 fail")
    assert bmc.power_state(h2) is None
    assert bmc.power_on(h2) is False
    fault(sim, "bmc kvm-002 ok")
    assert bmc.power_state(h2) == "Off"
    wrong = host_for(sim, "kvm-002", token=False)
    wrong.oobm_password = "guess"
    assert bmc.power_state(wrong) is None
    r = httpx.get(f"{sim.url}/bmc/kvm-002/redfish/v1/Systems/kvm-002", auth=("admin", "guess"))
    assert r.status_code == 401
    other = host_for(sim, "kvm-002", token=False)
    other.oobm_system_id = "kvm-001"  # not this BMC's system
    assert bmc.power_state(other) is None
    r = httpx.post(f"{sim.url}/bmc/kvm-002/redfish/v1/Systems/kvm-002/Actions/"
                   "ComputerSystem.Reset", json={"ResetType": "Explode"},
                   auth=("admin", "hadash-sim"))
    assert r.status_code == 400
    r = httpx.get(f"{sim.url}/bmc/kvm-002/redfish/v1/Systems", auth=("admin", "hadash-sim"))
    assert r.json()["Members"] == [{"@odata.id": "/bmc/kvm-002/redfish/v1/Systems/kvm-002"}]


# --- control API ------------------------------------------------------------------


def test_control_hosts_and_health(sim):
    hosts = httpx.get(f"{sim.url}/control/hosts", headers=CTL).json()
    assert [h["name"] for h in hosts] == ["kvm-001", "kvm-002", "kvm-003"]
    h1 = hosts[0]
    assert {k: h1[k] for k in ("powered", "agent", "network", "bmc", "start_fail")} == {
        "powered": True, "agent": True, "network": True, "bmc": True, "start_fail": 0}
    assert h1["vms"] == [{"name": "vm-0001", "power_state": "PowerOn"},
                         {"name": "vm-0004", "power_state": "PowerOn"}]
    health = httpx.get(f"{sim.url}/control/health", headers=CTL).json()
    assert health["ok"] is True
    assert health["hosts"] == 3 and health["vms_running"] == 6
    assert health["double_runs"] == {}
    assert httpx.get(f"{sim.url}/control/hosts/nope", headers=CTL).status_code == 404


def test_control_fault_vocabulary(sim):
    def apply(do: str) -> dict:
        r = fault(sim, do)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["ok"] is True and body["do"] == do
        return body

    h = apply("host kvm-001 network off")["hosts"][0]
    assert (h["name"], h["network"], h["reachable"]) == ("kvm-001", False, False)
    assert apply("host kvm-001 network on")["hosts"][0]["network"] is True
    assert apply("host kvm-001 agent stop")["hosts"][0]["agent"] is False
    assert apply("host kvm-001 agent start")["hosts"][0]["agent"] is True
    assert apply("host kvm-001 start-fail 4")["hosts"][0]["start_fail"] == 4
    assert apply("bmc kvm-001 fail")["hosts"][0]["bmc"] is False
    assert apply("bmc kvm-001 ok")["hosts"][0]["bmc"] is True
    crashed = apply("vm vm-0002 crash")["hosts"][0]
    assert crashed["name"] == "kvm-002"
    assert {"name": "vm-0002", "power_state": "PowerOff"} in crashed["vms"]  # stays listed
    vanished = apply("vm vm-0005 vanish")["hosts"][0]
    assert "vm-0005" not in {v["name"] for v in vanished["vms"]}
    off = apply("host kvm-003 power off")["hosts"][0]
    assert off["powered"] is False and off["vms"] == []
    on = apply("host kvm-003 power on")["hosts"][0]
    assert on["powered"] is True and on["vms"] == []
    assert apply("host kvm-003 power on")["hosts"][0]["powered"] is True  # no-op
    assert httpx.get(f"{sim.url}/control/health", headers=CTL).json()["faults"] == 12


@pytest.mark.parametrize("body, message", [
    ({"do": "host kvm-001 explode"}, "unknown fault"),
    ({"do": "host kvm-404 power off"}, "no simulated host 'kvm-404'"),
    ({"do": "bmc kvm-404 fail"}, "no simulated host"),
    ({"do": "vm nope crash"}, "no simulated VM 'nope'"),
    ({"do": "vm vm-0001 stop"}, "operator action"),
    ({"do": "host kvm-001 maintenance"}, "operator action"),
    ({"do": 42}, "missing"),
    ({}, "missing"),
])
def test_control_fault_errors(sim, body, message):
    r = httpx.post(f"{sim.url}/control/faults", json=body, headers=CTL, timeout=5)
    assert r.status_code == 400
    assert message in r.json()["error"]
    assert httpx.get(f"{sim.url}/control/health", headers=CTL).json()["faults"] == 0


def test_control_fault_bad_json(sim):
    r = httpx.post(f"{sim.url}/control/faults", content=b"{not json",
                   headers={**CTL, "Content-Type": "application/json"}, timeout=5)
    assert r.status_code == 400 and "error" in r.json()


def test_simulate_fault_command(sim, capsys):
    call_command("simulate", "fault", "host kvm-002 power off", control=sim.url)
    out = capsys.readouterr().out
    assert "applied: host kvm-002 power off" in out
    assert "kvm-002: powered=off" in out
    with pytest.raises(CommandError, match="no simulated host"):
        call_command("simulate", "fault", "host kvm-404 power off", control=sim.url)
    with pytest.raises(CommandError, match="does not answer"):
        call_command("simulate", "fault", "host kvm-001 power off",
                     control=f"http://127.0.0.1:{free_port()}")
    call_command("simulate", "status", control=sim.url)
    assert '"hosts": 3' in capsys.readouterr().out


def test_scheduled_faults_are_checked_up_front():
    with pytest.raises(FaultError, match="kvm-009"):
        SimulatorThread(Options(listen_port=0, agents=False, hosts=3, vms=0,
                                faults=[(1.0, "host kvm-009 power off")]))
    with pytest.raises(CommandError, match="SECONDS:FAULT"):
        call_command("simulate", fault=["soon:host kvm-001 power off"], hosts=1)


def test_processes_option():
    """--processes: auto is one ping process per 2,500 hosts, at most one per CPU,
    at least one; a number as given; anything else refused before anything runs."""
    from fleet.management.commands.simulate import Command

    cpus = os.cpu_count() or 1
    assert Command.processes("auto", 20) == 1
    assert Command.processes("auto", 10_000) == min(cpus, 4)
    assert Command.processes("0", 10_000) == 0
    assert Command.processes("3", 20) == 3
    with pytest.raises(CommandError, match="--processes"):
        call_command("simulate", processes="many", hosts=1)
    with pytest.raises(CommandError, match="--processes"):
        call_command("simulate", processes="-1", hosts=1)


def test_scheduled_fault_applies(sim):
    opts = Options(listen_port=0, agents=False, hosts=2, vms=2, status_interval=0,
                   faults=[(0.2, "host kvm-002 power off")])
    with SimulatorThread(opts) as st:
        wait_for(lambda: not httpx.get(f"{st.url}/control/hosts/kvm-002",
                                       headers=CTL).json()["powered"],
                 timeout=5, what="the scheduled fault")


# --- agent loops against a fake hadash server -------------------------------------


class FakeHadash:
    """Just enough of the agent side of hadash (PROTOCOL.md v1.1): connect — the join
    key enrols new names only (409 for an enrolled one unless re-enrolled), a host's
    token reconnects it and is echoed back —, ws pings, HTTP pings."""

    JOIN_KEY = "test-join-key"

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.tokens: dict[str, str] = {}  # host → current token
        self.server_tokens: dict[str, str] = {}  # host → the server's token for it
        self.reenrol: set[str] = set()  # hosts an operator re-enrolled
        self.connects: list[tuple[str, list, str]] = []  # (host, vms, "join"/"token")
        self.refused: list[tuple[str, int]] = []  # connects refused: (host, status)
        self.pings: list[tuple[str, float, list]] = []  # (host, time, vms)
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.api_calls: list[tuple[str, str, object]] = []  # operator API: (method, path, body)
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def host_for_token(self, request) -> str | None:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        return next((h for h, t in self.tokens.items() if t == token), None)

    async def connect(self, request):
        body = await request.json()
        name = body["name"]
        if request.headers.get("Authorization") == f"Bearer {self.JOIN_KEY}":
            if name in self.tokens and name not in self.reenrol:
                self.refused.append((name, 409))
                return web.json_response(
                    {"error": f"host {name} is already enrolled; it reconnects with its "
                              "own token, or an operator re-enrols it"}, status=409)
            self.reenrol.discard(name)
            n = len(self.connects)
            self.tokens[name], self.server_tokens[name] = f"token-{name}-{n}", f"srv-{name}-{n}"
            how = "join"
        elif self.host_for_token(request) == name:
            how = "token"
        else:
            self.refused.append((name, 401))
            return web.json_response({"error": "invalid join key or host token"}, status=401)
        self.connects.append((name, body["vms"], how))
        return web.json_response({"host_id": len(self.connects), "token": self.tokens[name],
                                  "server_token": self.server_tokens[name],
                                  "ping_interval": self.interval})

    def joins(self, name: str) -> int:
        return sum(1 for n, _, how in self.connects if n == name and how == "join")

    def reconnects(self, name: str) -> int:
        return sum(1 for n, _, how in self.connects if n == name and how == "token")

    async def ping(self, request):
        name = self.host_for_token(request)
        if name is None:
            return web.json_response({"error": "invalid host token"}, status=401)
        body = await request.json()
        self.pings.append((name, time.monotonic(), body["vms"]))
        return web.json_response({"ping_interval": self.interval})

    async def ws(self, request):
        name = self.host_for_token(request)
        if name is None:
            return web.Response(status=403)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets[name] = ws
        async for msg in ws:
            data = json.loads(msg.data)
            self.pings.append((name, time.monotonic(), data["vms"]))
            await ws.send_str(json.dumps({"type": "pong", "ping_interval": self.interval}))
        return ws

    async def operator_api(self, request):
        """The operator API of a hadash older than `POST /api/v1/hosts/bulk` (issue 12):
        no VMs known, each host's settings by PATCH, VMs by `vms/bulk`; `hosts/bulk`
        is `hosts/{name}`, which takes no POST (405)."""
        body = await request.json() if request.can_read_body else None
        self.api_calls.append((request.method, request.path, body))
        if request.method == "GET" and request.path == "/api/v1/vms":
            return web.json_response([])
        if request.method == "PATCH" and request.path.startswith("/api/v1/hosts/"):
            return web.json_response({"name": request.path.rsplit("/", 1)[1]})
        if request.method == "POST" and request.path == "/api/v1/vms/bulk":
            names = [v["name"] for v in body["vms"]]
            return web.json_response({"count": len(names), "names": names}, status=201)
        if request.method == "POST" and request.path == "/api/v1/hosts/bulk":
            return web.json_response({"error": 'Method "POST" not allowed.'}, status=405)
        return web.json_response({"error": "not found"}, status=404)

    async def _revoke(self, name: str, forget: bool) -> None:
        if forget:
            del self.tokens[name]  # as if the server's database had been reset
        else:
            self.tokens[name] = "revoked"
        ws = self.sockets.get(name)
        if ws is not None:
            await ws.close(code=4401)

    def revoke(self, name: str, *, forget: bool = False) -> None:
        """The host's token stops working (``forget``: the server forgets the host)."""
        asyncio.run_coroutine_threadsafe(self._revoke(name, forget), self.loop).result(5)

    def allow_reenrol(self, name: str) -> None:
        self.loop.call_soon_threadsafe(self.reenrol.add, name)

    async def _start(self):
        app = web.Application()
        app.router.add_post("/api/agent/v1/connect", self.connect)
        app.router.add_post("/api/agent/v1/ping", self.ping)
        app.router.add_get("/api/agent/v1/ws", self.ws)
        app.router.add_route("*", "/api/v1/{tail:.*}", self.operator_api)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001

    def __enter__(self):
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(5)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pings_of(self, name: str, since: float = 0.0) -> list[tuple[str, float, list]]:
        return [p for p in list(self.pings) if p[0] == name and p[1] >= since]


def test_registration_falls_back_to_a_patch_per_host_on_an_older_server(tmp_path):
    """A server without `POST /api/v1/hosts/bulk` (405 there, issue 12): the BMC
    settings go one PATCH per host, then the VMs by `vms/bulk` as ever."""
    with FakeHadash(interval=0.5) as server:
        opts = Options(server=server.url, listen_port=0, hosts=3, vms=6,
                       agent_key=FakeHadash.JOIN_KEY, api_token="operator-token",
                       status_interval=0, seed=2, state_file=str(tmp_path / "agents.jsonl"))
        with SimulatorThread(opts) as st:
            wait_for(lambda: st.call(lambda: st.sim.registration.get("state")) in (
                "done", "done with failures", "failed"), what="registration")
            reg = st.call(lambda: dict(st.sim.registration))
    assert reg["state"] == "done", reg
    assert reg["hosts"] == {"done": 3, "of": 3, "set": 3,
                            "via": "PATCH /api/v1/hosts/{name}"}
    assert reg["vms"]["registered"] == 6
    calls = [(m, p) for m, p, _ in server.api_calls if m != "GET"]
    assert calls[0] == ("POST", "/api/v1/hosts/bulk")
    assert sorted(calls[1:4]) == [("PATCH", f"/api/v1/hosts/kvm-00{i}") for i in (1, 2, 3)]
    assert calls[4:] == [("POST", "/api/v1/vms/bulk")]
    patch = next(b for m, p, b in server.api_calls if p == "/api/v1/hosts/kvm-001")
    assert patch["oobm_enabled"] and patch["oobm_system_id"] == "kvm-001"


@pytest.mark.parametrize(("transport", "processes"), [("ws", 0), ("http", 0), ("ws", 2),
                                                      ("http", 1)])
def test_agents_connect_and_ping_on_a_grid(transport, processes, tmp_path):
    """The agents in the simulator's own loop (processes 0) and in ping processes."""
    with FakeHadash(interval=0.2) as server:
        opts = Options(server=server.url, listen_port=0, hosts=3, vms=6, transport=transport,
                       agent_key=FakeHadash.JOIN_KEY, status_interval=0, seed=2,
                       state_file=str(tmp_path / "agents.jsonl"), processes=processes)
        with SimulatorThread(opts) as st:
            wait_for(lambda: all(len(server.pings_of(h)) >= 6 for h in st.sim.fleet.hosts),
                     what="pings from every host")
            # Each host enrolled once, with the join key (PROTOCOL.md v1.1).
            assert sorted(name for name, _, _ in server.connects) == ["kvm-001", "kvm-002",
                                                                      "kvm-003"]
            assert {how for _, _, how in server.connects} == {"join"}
            assert {n: vms for n, vms, _ in server.connects}["kvm-001"] == [
                {"name": "vm-0001", "power_state": "PowerOn"},
                {"name": "vm-0004", "power_state": "PowerOn"}]
            # On the grid t0 + k × 0.2: never more pings than slots in the span (a late
            # slot is not made up in a burst). How late they are is measured (below),
            # not timed here: the machine may be busy.
            times = [t for _, t, _ in server.pings_of("kvm-001")]
            assert len(times) - 1 <= (times[-1] - times[0]) / 0.2 + 1, times
            # The control API's view.
            # (ping processes report every 0.25 s: the counters may lag by that much)
            wait_for(lambda: httpx.get(f"{st.url}/control/health",
                                       headers=CTL).json()["pings"] >= 18,
                     what="the pings counted")
            health = httpx.get(f"{st.url}/control/health", headers=CTL).json()
            assert health["hosts_connected"] == 3
            # Lateness is reported for every ping (how late is a measurement, not
            # something a test may time: the machine may be busy).
            late = health["ping_late_ms"]
            assert late["samples"] >= 18 and 0 <= late["p50"] <= late["p99"] <= late["max"]

            # A crashed VM is reported PowerOff; a vanished one is left out.
            fault(st, "vm vm-0001 crash")
            fault(st, "vm vm-0004 vanish")
            now = time.monotonic()
            wait_for(lambda: any(p[2] == [{"name": "vm-0001", "power_state": "PowerOff"}]
                                 for p in server.pings_of("kvm-001", now)),
                     what="the crash in a report")

            # R29: the server stops accepting kvm-002's token. The agent tries its token
            # (401), then the join key, which may not take an enrolled host (409): it
            # waits for an operator and takes nothing over meanwhile.
            server.revoke("kvm-002")
            wait_for(lambda: ("kvm-002", 409) in server.refused,
                     what="the join key refused for an enrolled host")
            assert ("kvm-002", 401) in server.refused  # its token was tried first
            time.sleep(0.5)
            assert server.joins("kvm-002") == 1
            view = httpx.get(f"{st.url}/control/hosts/kvm-002", headers=CTL).json()
            assert view["connected"] is False
            # An operator re-enrols it: the next join-key connect takes it.
            server.allow_reenrol("kvm-002")
            wait_for(lambda: server.joins("kvm-002") == 2, timeout=15,
                     what="a join-key connect after the re-enrolment")
            now = time.monotonic()
            wait_for(lambda: server.pings_of("kvm-002", now), what="pings with the new token")

            # Network off: no pings; on: pings again with the same token (no connect).
            fault(st, "host kvm-003 network off")
            time.sleep(0.2)  # a ping already on the wire may still land
            now = time.monotonic()
            time.sleep(0.5)
            assert server.pings_of("kvm-003", now) == []
            assert httpx.get(f"{st.url}/control/hosts/kvm-003",
                             headers=CTL).json()["connected"] is False
            fault(st, "host kvm-003 network on")
            now = time.monotonic()
            wait_for(lambda: server.pings_of("kvm-003", now), what="pings after network on")
            assert [n for n, _, _ in server.connects].count("kvm-003") == 1

            # Power off: no pings; power on: the agent connects again — with its own
            # token (R29: a reconnect, not a new enrolment) — with no VMs.
            fault(st, "host kvm-003 power off")
            fault(st, "host kvm-003 power on")
            wait_for(lambda: [n for n, _, _ in server.connects].count("kvm-003") == 2,
                     what="a connect after power on")
            assert server.connects[-1] == ("kvm-003", [], "token")
            assert server.joins("kvm-003") == 1


@pytest.mark.parametrize("processes", [0, 1])
def test_simulator_keeps_its_credentials_across_a_restart(processes, tmp_path):
    """R29/R30: like a real agent, the simulator keeps each host's token and
    server_token on disk (owner-only); restarted, its hosts reconnect with their own
    tokens (no join key) and its agents accept the server's stored server_token. A
    host whose stored token the server no longer knows enrols again only because the
    join key gets a 200 for it."""
    state = tmp_path / "state" / "agents.jsonl"
    with FakeHadash(interval=0.2) as server:
        opts = Options(server=server.url, listen_port=0, hosts=2, vms=2,
                       agent_key=FakeHadash.JOIN_KEY, status_interval=0, seed=3,
                       state_file=str(state), processes=processes)
        with SimulatorThread(opts) as st:
            wait_for(lambda: all(server.pings_of(h) for h in ("kvm-001", "kvm-002")),
                     what="both hosts pinging")
        assert [server.joins(h) for h in ("kvm-001", "kvm-002")] == [1, 1]
        assert state.stat().st_mode & 0o777 == 0o600
        stored = [json.loads(line) for line in state.read_text().splitlines()]
        assert {(e["host"], e["token"], e["server_token"]) for e in stored} == {
            (h, server.tokens[h], server.server_tokens[h]) for h in ("kvm-001", "kvm-002")}

        with SimulatorThread(opts) as st:
            wait_for(lambda: all(server.reconnects(h) == 1 for h in ("kvm-001", "kvm-002")),
                     what="reconnects with the stored tokens")
            assert [server.joins(h) for h in ("kvm-001", "kvm-002")] == [1, 1]
            assert not server.refused
            # The server's calls carry the server_token it issued before the restart.
            h1 = Host(name="kvm-001", agent_url=st.sim.agent_url("kvm-001"),
                      server_token=server.server_tokens["kvm-001"])
            with HttpAgentClient(read_timeout=3) as agents:
                assert agents.check_health(h1) is True
                h1.server_token = "srv-guess"
                assert agents.check_health(h1) is False

            # The server forgets kvm-002 (its database was reset): the stored token is
            # refused, the join key enrols the unknown name afresh (200), and the new
            # credentials replace the old on disk.
            server.revoke("kvm-002", forget=True)
            wait_for(lambda: server.joins("kvm-002") == 2, what="a new enrolment")
            assert ("kvm-002", 401) in server.refused
            new_token = server.tokens["kvm-002"]

        with SimulatorThread(opts) as st:
            wait_for(lambda: server.reconnects("kvm-002") == 2, what="reconnect, new token")
            assert server.tokens["kvm-002"] == new_token and server.joins("kvm-002") == 2


def test_a_ping_process_that_dies_is_started_again(tmp_path):
    """The hosts of a ping process that died ping again from a new one, reconnecting
    with their own tokens (no second enrolment); VM changes made meanwhile in the main
    process reach the reports; /control/health counts the restart."""
    with FakeHadash(interval=0.2) as server:
        opts = Options(server=server.url, listen_port=0, hosts=2, vms=2, processes=1,
                       agent_key=FakeHadash.JOIN_KEY, status_interval=0, seed=4,
                       state_file=str(tmp_path / "agents.jsonl"))
        with SimulatorThread(opts) as st:
            wait_for(lambda: all(server.pings_of(h) for h in ("kvm-001", "kvm-002")),
                     what="both hosts pinging")
            os.kill(st.sim.pingers[0].proc.pid, signal.SIGKILL)
            fault(st, "vm vm-0001 crash")
            wait_for(lambda: all(server.reconnects(h) == 1 for h in ("kvm-001", "kvm-002")),
                     what="reconnects from the new ping process")
            now = time.monotonic()
            wait_for(lambda: any(p[2] == [{"name": "vm-0001", "power_state": "PowerOff"}]
                                 for p in server.pings_of("kvm-001", now)),
                     what="the crash in a report from the new process")
            assert [server.joins(h) for h in ("kvm-001", "kvm-002")] == [1, 1]
            health = httpx.get(f"{st.url}/control/health", headers=CTL).json()
            assert health["processes"] == 1 and health["processes_alive"] == 1
            assert health["processes_restarted"] == 1


def test_agents_back_off_while_the_server_is_down():
    port = free_port()  # nobody listens there
    opts = Options(server=f"http://127.0.0.1:{port}", listen_port=0, hosts=2, vms=2,
                   status_interval=0)
    with SimulatorThread(opts) as st:
        time.sleep(0.5)
        health = httpx.get(f"{st.url}/control/health", headers=CTL).json()
        assert health["hosts_connected"] == 0 and health["pings"] == 0
        # Still serving its agents and BMCs (a fault works, too).
        assert fault(st, "host kvm-001 power off").status_code == 200


# --- end to end: daphne + simulator subprocess ------------------------------------


def database_url(settings_dict: dict) -> str:
    engine = settings_dict["ENGINE"]
    name = settings_dict["NAME"]
    if engine.endswith("sqlite3"):
        return "sqlite:///" + str(Path(name).resolve())
    if "postgresql" in engine:
        user = quote(settings_dict.get("USER") or "", safe="")
        password = quote(settings_dict.get("PASSWORD") or "", safe="")
        auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
        host = settings_dict.get("HOST") or "127.0.0.1"
        port = settings_dict.get("PORT") or 5432
        return f"postgres://{auth}{host}:{port}/{quote(name, safe='')}"
    pytest.skip(f"no end-to-end run for {engine}")


def stop_process(proc: subprocess.Popen, grace: float = 5.0) -> float:
    """SIGTERM, then SIGKILL after ``grace`` s; returns how long it took to exit."""
    if proc.poll() is not None:
        return 0.0
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    return time.monotonic() - t0


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 30.0):
    def up():
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}):\n{log.read_text()}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(up, timeout=timeout, interval=0.2, what=f"port {port}")


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_simulator_against_a_real_server(tmp_path):
    from django.contrib.auth import get_user_model
    from django.db import connection

    from hadash import config
    from hadash.models import ApiToken, Event
    from hosts.choices import HostStatus
    from vms.choices import PowerState, VmState

    user = get_user_model().objects.create_user("simulator", is_staff=True)
    _, api_token = ApiToken.issue(user)
    config.set_value("ping.interval", "1", by="test")
    env = {**os.environ, "DATABASE_URL": database_url(connection.settings_dict),
           "HADASH_SIM_STATE_FILE": str(tmp_path / "agents.jsonl"),
           "PYTHONUNBUFFERED": "1"}
    server_port, sim_port = free_port(), free_port()
    bin_dir = Path(sys.executable).parent
    server_log, sim_log = tmp_path / "daphne.log", tmp_path / "simulate.log"
    procs: list[subprocess.Popen] = []
    try:
        with server_log.open("w") as out:
            procs.append(subprocess.Popen(
                [str(bin_dir / "daphne"), "-b", "127.0.0.1", "-p", str(server_port),
                 "hadash.asgi:application"], cwd=ROOT, env=env, stdout=out,
                stderr=subprocess.STDOUT))
        wait_for_port(server_port, procs[0], server_log)
        with sim_log.open("w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "manage.py", "simulate",
                 "--server", f"http://127.0.0.1:{server_port}",
                 "--listen", f"127.0.0.1:{sim_port}", "--hosts", "3", "--vms", "6",
                 "--api-token", api_token, "--start-delay", "0", "--status-interval", "0",
                 "--seed", "1"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
        sim = procs[1]

        def registered():
            if sim.poll() is not None:
                raise AssertionError(f"simulator exited:\n{sim_log.read_text()}")
            hosts_up = Host.objects.filter(status=HostStatus.UP,
                                           oobm_address__startswith="http://").count()
            running = VMInstance.objects.filter(state=VmState.RUNNING,
                                                power_state=PowerState.POWER_ON).count()
            return hosts_up == 3 and running == 6

        try:
            wait_for(registered, timeout=30, interval=0.3, what="hosts Up and VMs registered")
        except AssertionError:
            raise AssertionError(f"{sim_log.read_text()}\n---\n{server_log.read_text()}"
                                 ) from None
        hosts = {h.name: h for h in Host.objects.all()}
        assert set(hosts) == {"kvm-001", "kvm-002", "kvm-003"}
        h1 = hosts["kvm-001"]
        assert h1.agent_url == f"http://127.0.0.1:{sim_port}/agents/kvm-001"
        assert h1.oobm_enabled and h1.oobm_system_id == "kvm-001"
        # The BMC settings went in one POST /api/v1/hosts/bulk (issue 12), each host with
        # the event the single PATCH writes.
        reg = httpx.get(f"http://127.0.0.1:{sim_port}/control/health", headers=CTL,
                        timeout=5).json()["registration"]
        assert reg["hosts"] == {"done": 3, "of": 3, "set": 3,
                                "via": "POST /api/v1/hosts/bulk"}, reg
        assert Event.objects.filter(event="SettingsChanged", subject="host",
                                    reason="simulator").count() == 3
        assert set(VMInstance.objects.filter(host=h1).values_list("name", flat=True)) == {
            "vm-0001", "vm-0004"}

        # Pings (over the websocket) keep last_ping fresh.
        before = {h.name: h.last_ping for h in hosts.values()}
        wait_for(lambda: all(h.last_ping > before[h.name] for h in Host.objects.all()),
                 timeout=10, interval=0.2, what="pings after connect")
        assert all(dt.datetime.now(dt.UTC) - h.last_ping < dt.timedelta(seconds=5)
                   for h in Host.objects.all())

        # The server's own clients reach the agent (with the server_token the server
        # issued on connect) and the BMC (with the settings the simulator registered).
        h1.refresh_from_db()
        with HttpAgentClient() as agents, RedfishClient() as bmc:
            assert agents.check_health(h1) is True
            assert agents.get_vm(h1, "vm-0001") == "PowerOn"
            assert bmc.power_state(h1) == "On"
        # R30: the simulator kept each host's credentials like a real agent; the server
        # holds only the token's hash.
        stored = {e["host"]: e for e in map(json.loads,
                                            (tmp_path / "agents.jsonl").read_text().splitlines())}
        assert set(stored) == {"kvm-001", "kvm-002", "kvm-003"}
        assert h1.token_matches(stored["kvm-001"]["token"])
        assert stored["kvm-001"]["server_token"] == h1.server_token

        # A fault through the control API reaches the database through the pings.
        r = httpx.post(f"http://127.0.0.1:{sim_port}/control/faults",
                       json={"do": "vm vm-0001 crash"}, headers=CTL, timeout=5)
        assert r.status_code == 200
        wait_for(lambda: VMInstance.objects.get(name="vm-0001").power_state
                 == PowerState.POWER_OFF, timeout=10, interval=0.2,
                 what="the crash reported")

        # SIGTERM: a clean, quick shutdown.
        assert stop_process(sim) < 4.0
        assert sim.returncode == 0, sim_log.read_text()
        assert "simulator stopped" in sim_log.read_text()
    finally:
        for proc in reversed(procs):
            stop_process(proc)
