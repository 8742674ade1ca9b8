"""The real-fleet tier (issue 9 part 4): hadash against real hosts — network namespaces,
one libvirtd each with tiny diskless qemu guests, hadash-agent, a Redfish BMC — on this
machine. See bench/realfleet.py (shared with `bench agent-crash`) for how a host is
built and docs/testing.md for what it needs.

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
import time
from dataclasses import dataclass, field

import httpx
import pytest

from bench.realfleet import (
    BMC,
    SERVER_IP,
    SUBNET,
    Booting,
    Fleet,
    Guest,
    Reaper,
    become_subreaper,
    enrol_and_register,
    fleet_lock,
    guests_plan,
    is_debian,
    requirements_problem,
    start_hadash,
    subnet_problem,
    sweep,
)
from hadash.supervisor import Supervisor, free_port
from tests.conftest import fresh_database, pg_admin_url

CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}

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
                    enrol_and_register(api, fleet, bmc, guests)
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


@pytest.fixture
def logs_on_failure(request, realfleet):
    yield realfleet
    report = getattr(request.node, "realfleet_call", None)
    if report is not None and report.failed:
        print(realfleet.dump())
