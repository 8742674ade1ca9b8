"""The real-fleet tier (issue 9 part 4): hadash against real hosts — network namespaces,
one libvirtd each with tiny diskless qemu guests, hadash-agent, a Redfish BMC — on this
machine. See fleet.py for how a host is built and docs/testing.md for what it needs.

Runs on the PostgreSQL pass of the suite only (``DATABASE_URL=postgres://…``): a real
daphne and django-q engine on a fresh PostgreSQL database. Elsewhere it is skipped with
the reason: not root, not Linux, packages missing (scripts/setup installs them as root on
Debian), network namespaces not allowed. Under ``CI=true`` on a root Debian machine
those are failures instead: there it must run. ``HADASH_REALFLEET=0`` switches the tier
off (skipped, saying so). ``HADASH_E2E_ECHO=1`` prints every process's output live.

Guests are defined (persistent) and started on their home host only. Their agents
report them with their definitions; hadash lists them as unmanaged and the operator
adopts them (``POST /api/v1/unmanaged-vms/adopt``), which stores each definition on its
VM. An HA restart elsewhere sends that definition with ``start`` (PROTOCOL.md v1.1) and
the agent there runs it as a transient domain. The guests have no disks, so nothing
else needs to be shared.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from hadash.supervisor import Supervisor, free_port, wait_for_port
from tests.conftest import fresh_database, manage, pg_admin_url, wait_for

from .fleet import (
    BMC,
    SERVER_IP,
    SUBNET,
    Fleet,
    Guest,
    Reaper,
    become_subreaper,
    fleet_lock,
    is_debian,
    requirements_problem,
    subnet_problem,
    sweep,
)

CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}

# The engine's timings, shortened so that detection and recovery take seconds.
CONFIG = {
    "ping.interval": "2", "ping.timeout": "2",  # behind on ping after 4 s
    "investigate.retry.interval": "5", "restart.retry.interval": "5",
    "migrate.retry.interval": "10",
    "alert.wait": "10",  # a host nobody can tell about goes Alert after 10 s
}

# What the stories measure (seconds), shown at the end of the run and kept for
# docs/benchmarks.md.
MEASURED: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("real fleet: measured")
        for what, seconds in MEASURED.items():
            terminalreporter.write_line(f"{what}: {seconds:.1f} s")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"realfleet_{report.when}", report)
    return report


def not_possible(reason: str):
    """Skip with ``reason`` — or fail, under CI=true on a root Debian machine, where
    this tier must run."""
    if CI and os.geteuid() == 0 and is_debian():
        pytest.fail(f"the real-fleet tier cannot run (CI=true, root, Debian): {reason}",
                    pytrace=False)
    pytest.skip(f"real-fleet tier: {reason}")


@dataclass
class RealFleet:
    """The running system: hadash (daphne + engine) and the fleet."""

    fleet: Fleet
    sup: Supervisor  # hadash's processes
    env: dict[str, str]
    api: httpx.Client
    bmc: BMC
    guests: dict[str, Guest]
    started: float = field(default_factory=time.monotonic)

    # --- the operator API ---------------------------------------------------------
    def vm(self, name: str) -> dict:
        r = self.api.get(f"/vms/{name}")
        assert r.status_code == 200, r.text
        return r.json()

    def host(self, name: str) -> dict:
        r = self.api.get(f"/hosts/{name}")
        assert r.status_code == 200, r.text
        return r.json()

    def ha_work(self, vm: str) -> list[dict]:
        r = self.api.get("/ha-work", params={"vm": vm})
        assert r.status_code == 200, r.text
        return r.json()

    def last_event_id(self) -> int:
        rows = self.api.get("/events", params={"latest": "true", "limit": 1}).json()
        return rows[-1]["id"] if rows else 0

    def events(self, after: int) -> list[dict]:
        r = self.api.get("/events", params={"after": after, "limit": 5000})
        assert r.status_code == 200, r.text
        return r.json()

    # --- the BMC, as the operator (or hadash) talks to it ---------------------------
    def bmc_reset(self, host: str, reset: str) -> int:
        r = httpx.post(f"{self.bmc.url}/redfish/v1/Systems/{host}/Actions/ComputerSystem.Reset",
                       json={"ResetType": reset}, auth=(self.bmc.username, self.bmc.password),
                       timeout=30, trust_env=False)
        return r.status_code

    def bmc_power(self, host: str) -> str:
        r = httpx.get(f"{self.bmc.url}/redfish/v1/Systems/{host}",
                      auth=(self.bmc.username, self.bmc.password), timeout=10, trust_env=False)
        assert r.status_code == 200, r.text
        return r.json()["PowerState"]

    # --- diagnostics ----------------------------------------------------------------------
    def dump(self, lines: int = 40) -> str:
        out = []
        for child in [*self.sup.children, *self.fleet.sup.children]:
            out.append(f"---- {child.name} (last {lines} lines)")
            out.extend(child.log[-lines:])
        with contextlib.suppress(Exception):
            out.append("---- the last 40 events")
            rows = self.api.get("/events", params={"latest": "true", "limit": 40}).json()
            out.extend(f"{e['time']} {e['event']} {e['subject_name']}: {e['message']}"
                       for e in rows)
        out.append(f"---- monitor: {self.fleet.monitor.virsh_samples} virsh samples, "
                   f"{self.fleet.monitor.proc_samples} /proc samples; violations: "
                   f"{self.fleet.monitor.violations}")
        return "\n".join(out)


def start_hadash(sup: Supervisor, env: dict[str, str], port: int) -> httpx.Client:
    """Migrate, then daphne and the django-q engine (as tests/conftest.py does for the
    e2e suite), the engine's timings shortened; the operator API client."""
    manage(env, "migrate", "--noinput", "-v0")
    token = manage(env, "apitoken", "realfleet", "--create").strip().splitlines()[-1]
    api = httpx.Client(base_url=f"http://{SERVER_IP}:{port}/api/v1", timeout=30,
                       headers={"Authorization": f"Bearer {token}"}, trust_env=False)
    web = sup.python("web", "-m", "daphne", "-b", SERVER_IP, "-p", str(port),
                     "hadash.asgi:application")
    wait_for_port(port, host=SERVER_IP, proc=web.proc, timeout=90)
    for key, value in CONFIG.items():
        r = api.put(f"/config/{key}", json={"value": value})
        assert r.status_code == 200, f"config {key}: {r.text}"
    manage(env, "engine", "start")
    sup.manage("engine", "qcluster")
    return api


def guests_plan() -> dict[str, Guest]:
    """Two HA guests and a plain one on host 1, one HA guest on each of the others.
    Every host has 2 cpus in hadash's eyes (this machine's): after host 1 fails, its
    two HA guests fit one on each of the others."""
    plan = [Guest("vm-a", "hdrf-h1", priority="high"), Guest("vm-b", "hdrf-h1"),
            Guest("vm-c", "hdrf-h1", ha=False), Guest("vm-d", "hdrf-h2"),
            Guest("vm-e", "hdrf-h3")]
    return {g.name: g for g in plan}


@pytest.fixture(scope="module")
def realfleet(tmp_path_factory):
    if os.environ.get("HADASH_REALFLEET", "").strip().lower() in {"0", "false", "no", "off"}:
        pytest.skip("real-fleet tier switched off (HADASH_REALFLEET=0)")
    if pg_admin_url() is None:
        pytest.skip("real-fleet tier: runs on the PostgreSQL pass only "
                    "(DATABASE_URL=postgres://…)")
    problem = requirements_problem()
    if problem:
        not_possible(problem)
    echo = bool(os.environ.get("HADASH_E2E_ECHO"))
    started = time.monotonic()
    with fleet_lock():
        sweep()  # what an earlier run that died left behind
        problem = subnet_problem()
        if problem:
            not_possible(problem)
        base = tmp_path_factory.mktemp("realfleet")
        fleet = Fleet(base / "hosts", echo=echo)
        fleet.join_key = secrets.token_urlsafe(32)
        guests = guests_plan()
        become_subreaper(True)
        reaper = Reaper()
        reaper.start()
        sup = Supervisor(echo=echo, grace=8.0)
        api: httpx.Client | None = None
        booting: Booting | None = None
        problems: list[str] = []
        try:
            try:
                fleet.build()
            except RuntimeError as exc:
                not_possible(f"cannot build the hosts' network namespaces: {exc}")
            port = free_port(SERVER_IP)
            fleet.server_url = f"http://{SERVER_IP}:{port}"
            # The hosts boot (libvirtd, agents, guests) while hadash's database is
            # migrated; the agents retry until daphne answers.
            booting = Booting(fleet, guests)
            booting.start()
            with fresh_database(base, "realfleet") as url:
                env = {**os.environ, "DATABASE_URL": url, "HADASH_VAR_DIR": str(base),
                       "SECRET_KEY": secrets.token_urlsafe(50),
                       "HADASH_AGENT_KEY": fleet.join_key,
                       "HADASH_AGENT_NETWORKS": f"{SUBNET}.0/24",
                       "HADASH_ENGINE_LOOPS": "2", "HADASH_LOG": "INFO",
                       "ALLOWED_HOSTS": f"{SERVER_IP},localhost,127.0.0.1"}
                env.pop("DEBUG", None)
                env.pop("CI", None)
                sup.base_env = env
                try:
                    api = start_hadash(sup, env, port)
                    bmc = BMC(fleet, "admin", secrets.token_urlsafe(16))
                    fleet.bmc = bmc
                    bmc.start()
                    rf = RealFleet(fleet=fleet, sup=sup, env=env, api=api, bmc=bmc,
                                   guests=guests, started=started)
                    booting.join()
                    if booting.error:
                        not_possible(f"cannot boot the hosts: {booting.error}")
                    enrol_and_register(rf)
                    MEASURED["set-up (hadash, 3 hosts, 5 guests)"] = time.monotonic() - started
                    # The monitor's two views must see what runs where, or its silence
                    # through the run would prove nothing.
                    homes = {g.name: [g.home] for g in guests.values()}
                    assert fleet.monitor.virsh_view() == homes
                    assert fleet.monitor.proc_view() == homes
                    fleet.monitor.start()
                except BaseException:
                    for child in [*sup.children, *fleet.sup.children]:
                        print(f"---- {child.name} (last lines)\n" + "\n".join(child.log[-40:]))
                    raise
                yield rf
                fleet.monitor.stop()
        finally:
            if booting is not None:
                booting.join()
            with contextlib.suppress(Exception):
                fleet.monitor.stop()
            if api is not None:
                api.close()
            sup.stop()
            problems += [f"hadash pid {p} left running" for p in sup.leftovers()]
            problems += fleet.teardown()
            reaper.stop()
            become_subreaper(False)
    MEASURED["the tier's run (set-up to teardown)"] = time.monotonic() - started
    assert problems == [], f"left behind: {problems}"


class Booting(threading.Thread):
    """The hosts' side of the set-up, which needs no hadash: power every host on
    (libvirtd probes qemu once; the others get its cache), then define each guest on
    its home host and start it there."""

    def __init__(self, fleet: Fleet, guests: dict[str, Guest]):
        super().__init__(name="realfleet-boot", daemon=True)
        self.fleet, self.guests = fleet, guests
        self.error = ""

    def run(self) -> None:
        try:
            fleet = self.fleet
            first, others = fleet.hosts[0], fleet.hosts[1:]
            first.power_on()
            first.warm_up()
            for h in others:
                first.copy_capabilities_to(h)
            errors: list[str] = []

            def boot(h):
                try:
                    h.power_on()
                except Exception as exc:
                    errors.append(f"{h.name}: {exc}")

            threads = [threading.Thread(target=boot, args=(h,)) for h in others]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise RuntimeError("; ".join(errors))
            for g in self.guests.values():
                home = fleet.host(g.home)
                home.define(g)
                home.start(g)
        except Exception as exc:
            self.error = str(exc) or repr(exc)


def enrol_and_register(rf: RealFleet) -> None:
    """hadash's side, as an operator does it: every agent enrolled and Up, the BMC
    settings on every host row, the guests — listed as unmanaged, with the definitions
    their agents sent — adopted in one call (HA on or off, priority), each Running on its
    host with its definition stored."""
    fleet, api = rf.fleet, rf.api
    names = [h.name for h in fleet.hosts]

    def status(name):
        r = api.get(f"/hosts/{name}")
        return r.json()["status"] if r.status_code == 200 else None

    wait_for("every host Up", lambda: all(status(n) == "Up" for n in names), 60)
    for h in fleet.hosts:
        r = api.patch(f"/hosts/{h.name}", json={
            "oobm_enabled": True, "oobm_address": rf.bmc.url, "oobm_system_id": h.name,
            "oobm_username": rf.bmc.username, "oobm_password": rf.bmc.password})
        assert r.status_code == 200, f"BMC settings of {h.name}: {r.text}"
    want = {(g.name, g.home) for g in rf.guests.values()}

    def listed():
        rows = api.get("/unmanaged-vms").json()
        ready = {(r["name"], r["host"]) for r in rows
                 if r["has_definition"] and r["power_state"] == "PowerOn"}
        return want <= ready

    wait_for("the guests listed as unmanaged, running, with definitions", listed, 60)
    r = api.post("/unmanaged-vms/adopt", json={"vms": [
        {"name": g.name, "host": g.home, "ha_enabled": g.ha, "priority": g.priority}
        for g in rf.guests.values()]})
    assert r.status_code == 201, f"adopting the guests: {r.text}"
    wait_for("every guest Running, PowerOn on its host", lambda: all(
        (v := rf.vm(g.name))["state"] == "Running" and v["power_state"] == "PowerOn"
        and v["host"] == g.home for g in rf.guests.values()), 30)
    for g in rf.guests.values():
        vm = rf.vm(g.name)
        assert (vm["cpus"], vm["memory_mb"]) == (1, 64), vm  # from the definition
        d = api.get(f"/vms/{g.name}/definition").json()
        assert d["format"] == "libvirt-xml" and g.uuid in d["xml"], d


@pytest.fixture
def logs_on_failure(request, realfleet):
    yield realfleet
    report = getattr(request.node, "realfleet_call", None)
    if report is not None and report.failed:
        print(realfleet.dump())
