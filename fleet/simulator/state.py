"""The simulator's truth about its machines, and the fault vocabulary.

Built on :mod:`fleet.sim` (the scenario runner's in-process fleet): the same
:class:`~fleet.sim.SimHost` state (powered, agent running, network on, BMC ok,
start-fail count, the VMs its hypervisor knows) and the same fault semantics
(``power off`` kills the VMs, ``power on`` boots with none, ``vm crash`` leaves a
PowerOff entry, ``vm vanish`` forgets the VM). What the simulator process adds per host
is small: the credentials the agent got from ``connect`` (kept on disk like a real
agent's: :class:`CredentialStore`), whether it must connect again, its ping bookkeeping
and its agent task.

Faults are parsed with the scenario runner's own patterns (``fleet.scenario``), so the
vocabulary is exactly ``../shared/scenarios/README.md``'s. Operator actions of that
vocabulary (``vm V stop``, ``host H disable`` …) are hadash's, not the fleet's: they are
refused here with a pointer to the operator API.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.scenario import BMC_EVENT, HOST_EVENT, VM_EVENT
from fleet.sim import SimFleet, SimHost

__all__ = ["CredentialStore", "Fault", "FaultError", "Fleet", "Host", "VmSpec", "demo_fleet",
           "parse_fault"]

log = logging.getLogger("fleet.simulator")

# The first simulated host's address; host i (from 0) has FIRST_ADDRESS + i.
FIRST_ADDRESS = ipaddress.IPv4Address("10.0.0.1")

# Operator actions in the scenario vocabulary: not something a machine does.
OPERATOR_ACTIONS = ("disable", "enable", "maintenance", "cancel-maintenance")


class FaultError(ValueError):
    """An unknown fault, or one naming an unknown host or VM (nothing was changed)."""


@dataclass(eq=False)
class Host(SimHost):
    """One simulated machine: hypervisor, agent and BMC."""

    address: str = ""
    token: str | None = None  # the agent's token from `connect` (its pings, reconnects)
    server_token: str | None = None  # what the server presents on its calls to the agent
    token_refused: bool = False  # the server answered the stored token with 401
    must_connect: bool = True  # the agent (re)started: connect before pinging
    host_id: int | None = None  # the server's id for it, from `connect`
    ping_interval: float = 10.0
    linked: bool = False  # the agent has a working link to the server (connected, pinging)
    last_ack: float = 0.0  # loop time of the last ping the server acknowledged
    starting: set[str] = field(default_factory=set)  # VMs whose start is under way
    task: Any = None  # the agent's asyncio task (None: not running)

    def power_report(self) -> list[dict[str, str]]:
        return [{"name": n, "power_state": s} for n, s in self.vms.items()]

    def ping_message(self) -> str:
        """A websocket ping's JSON text (the VMs change in place here: made afresh)."""
        return json.dumps({"type": "ping", "vms": self.power_report()})


class CredentialStore:
    """Each host's credentials on disk, as a real agent keeps them (PROTOCOL.md v1.1):
    the token from its enrolment and the server_token the server presents, per server
    URL, so a restarted simulator reconnects its hosts with their own tokens instead of
    enrolling them again (which the server refuses: 409, R29).

    One file of JSON lines, ``{"server", "host", "token", "server_token", "host_id"}``,
    appended to on every enrolment (cheap, and a torn last line after a crash is just
    skipped) and compacted when loaded; readable by its owner only. ``path`` None keeps
    credentials in memory only."""

    def __init__(self, path: str | os.PathLike | None, server: str):
        self.path = Path(path) if path else None
        self.server = server.rstrip("/")

    def load(self) -> dict[str, dict[str, Any]]:
        """This server's stored credentials by host name (and the file compacted)."""
        if self.path is None or not self.path.exists():
            return {}
        latest: dict[tuple[str, str], dict[str, Any]] = {}
        with self.path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    key = (str(entry["server"]), str(entry["host"]))
                except (ValueError, KeyError, TypeError):
                    continue  # a torn line
                if entry.get("token"):
                    latest[key] = entry
                else:
                    latest.pop(key, None)
        self._write(list(latest.values()))
        return {host: e for (server, host), e in latest.items() if server == self.server}

    def save(self, h: Host) -> None:
        """Append the host's current credentials (raises OSError)."""
        if self.path is None:
            return
        entry = {"server": self.server, "host": h.name, "token": h.token,
                 "server_token": h.server_token, "host_id": h.host_id}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def _write(self, entries: list[dict[str, Any]]) -> None:
        assert self.path is not None
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(e) + "\n" for e in entries)
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def restore(self, fleet: Fleet) -> int:
        """Give the fleet's hosts their stored credentials; returns how many."""
        try:
            stored = self.load()
        except OSError as exc:
            log.error("cannot read stored agent credentials from %s: %s", self.path, exc)
            return 0
        n = 0
        for name, e in stored.items():
            h = fleet.hosts.get(name)
            if h is None:
                continue
            h.token = str(e["token"])
            h.server_token = str(e["server_token"]) if e.get("server_token") else None
            h.host_id = e.get("host_id") if isinstance(e.get("host_id"), int) else None
            n += 1
        return n


@dataclass(frozen=True)
class VmSpec:
    """A demo VM, as registered through the operator API."""

    name: str
    home: str
    cpus: int
    memory_mb: int
    ha_enabled: bool
    priority: str


@dataclass(frozen=True)
class Fault:
    """One parsed fault: ``kind`` host/bmc/vm, the host or VM name, what happens."""

    text: str
    kind: str
    target: str
    what: str
    count: int = 0  # start-fail N


FAULTS_HELP = (
    "host H power off|power on|agent stop|agent start|network off|network on|start-fail N, "
    "bmc H fail|ok, vm V crash|vanish"
)


def parse_fault(do: str) -> Fault:
    """Parse one fault of the scenario vocabulary (``fleet.scenario``'s patterns)."""
    if not isinstance(do, str):
        raise FaultError(f"a fault is a string such as 'host kvm-001 power off', not {do!r}")
    text = " ".join(do.split())
    if m := HOST_EVENT.match(text):
        what = m.group(2)
        if what in OPERATOR_ACTIONS:
            raise FaultError(
                f"{text!r} is an operator action, not a machine fault: use hadash's "
                f"operator API (POST /api/v1/hosts/{m.group(1)}/{what})"
            )
        if m.group(3) is not None:
            return Fault(text, "host", m.group(1), "start-fail", int(m.group(3)))
        return Fault(text, "host", m.group(1), what)
    if m := BMC_EVENT.match(text):
        return Fault(text, "bmc", m.group(1), m.group(2))
    if m := VM_EVENT.match(text):
        if m.group(2) == "stop":
            raise FaultError(
                f"{text!r} is an operator action, not a machine fault: use hadash's "
                f"operator API (POST /api/v1/vms/{m.group(1)}/stop)"
            )
        return Fault(text, "vm", m.group(1), m.group(2))
    raise FaultError(f"unknown fault {text!r}; expected one of: {FAULTS_HELP}")


class Fleet(SimFleet):
    """:class:`fleet.sim.SimFleet` with the simulator's hosts and fault parser."""

    hosts: dict[str, Host]

    def __init__(self) -> None:
        super().__init__()
        self.vm_specs: dict[str, VmSpec] = {}
        self.fault_count = 0

    def add_host(self, name: str, **kw) -> Host:
        h = Host(name=name, **kw)
        self.hosts[name] = h
        return h

    def host(self, name: str) -> Host:
        h = self.hosts.get(name)
        if h is None:
            raise FaultError(f"no simulated host {name!r}")
        return h

    def knows_vm(self, vm: str) -> bool:
        return vm in self.vm_specs or any(vm in h.vms for h in self.hosts.values())

    # --- faults -------------------------------------------------------------------
    def check(self, do: str) -> Fault:
        """Parse a fault and check that its host or VM exists; changes nothing."""
        fault = parse_fault(do)
        if fault.kind == "vm":
            if not self.knows_vm(fault.target):
                raise FaultError(f"no simulated VM {fault.target!r}")
        else:
            self.host(fault.target)
        return fault

    def apply(self, do: str) -> list[Host]:
        """Apply one fault of the scenario vocabulary; returns the hosts it touched.

        Raises :class:`FaultError` (and changes nothing) for an unknown fault, host or
        VM. Idempotent where a machine would be: powering on a running machine or
        starting a running agent changes nothing (no reboot)."""
        fault = self.check(do)
        name, what = fault.target, fault.what
        if fault.kind == "vm":
            touched = [h for h in self.hosts.values() if name in h.vms]
            if what == "crash":
                self.vm_crash(name)
            else:
                self.vm_vanish(name)
            self.fault_count += 1
            return touched
        h = self.host(name)
        if fault.kind == "bmc":
            self.bmc(name, what == "ok")
        elif what == "power off":
            if h.powered:
                self.power_off(name)
                h.starting.clear()
        elif what == "power on":
            if not h.powered:
                self.power_on(name)
                h.must_connect = True  # a booting machine starts its agent afresh
        elif what == "agent stop":
            self.agent_stop(name)
        elif what == "agent start":
            if not h.agent_running:
                self.agent_start(name)
                h.must_connect = True
        elif what == "network off":
            self.network(name, False)
        elif what == "network on":
            self.network(name, True)
        else:  # start-fail N
            self.start_fail(name, fault.count)
        self.fault_count += 1
        return [h]

    # --- views --------------------------------------------------------------------
    def view(self, h: Host, now: float, vms: bool = True) -> dict[str, Any]:
        """A host as the control API shows it (``vms=False``: without the VM list)."""
        running = sum(1 for s in h.vms.values() if s == "PowerOn")
        view = {
            "name": h.name,
            "cluster": h.cluster,
            "cpus": h.cpus,
            "memory_mb": h.memory_mb,
            "powered": h.powered,
            "agent": h.agent_running,
            "network": h.network_on,
            "bmc": h.bmc_ok,
            "start_fail": h.start_fail,
            "reachable": h.reachable,
            "connected": h.linked and h.reachable,
            "last_ping_age": round(now - h.last_ack, 3) if h.last_ack else None,
            "ping_interval": h.ping_interval,
            "vms_running": running,
            "vms_powered_off": len(h.vms) - running,
            "vms_starting": len(h.starting),
        }
        if vms:
            view["vms"] = [{"name": n, "power_state": s} for n, s in sorted(h.vms.items())]
            view["starting"] = sorted(h.starting)
        return view


def _width(n: int, minimum: int) -> int:
    return max(minimum, len(str(n)))


def demo_fleet(
    *,
    hosts: int,
    vms: int,
    ha_ratio: float = 0.5,
    clusters: int = 1,
    cpus: int = 32,
    memory_mb: int = 131072,
    seed: int | None = None,
) -> Fleet:
    """``hosts`` machines ``kvm-001…`` over clusters ``c1…cK`` (round-robin), and
    ``vms`` VMs ``vm-0001…`` of 1–2 CPUs and 1–4 GB, placed round-robin on the hosts
    and running there. A fraction ``ha_ratio`` of them (spread evenly) is HA-enabled;
    their priority cycles high, medium, low."""
    if hosts < 1:
        raise ValueError("at least one host is needed")
    if vms < 0 or not 0.0 <= ha_ratio <= 1.0 or clusters < 1:
        raise ValueError("vms must be >= 0, ha_ratio in [0, 1], clusters >= 1")
    rng = random.Random(seed)
    fleet = Fleet()
    hw = _width(hosts, 3)
    for i in range(hosts):
        name = f"kvm-{i + 1:0{hw}d}"
        fleet.add_host(
            name,
            cluster=f"c{i % clusters + 1}",
            cpus=cpus,
            memory_mb=memory_mb,
            # 10.0.0.1, 10.0.0.2, … counted on: 10.0.0.255, then 10.0.1.0 (in 10.0.0.0/8 a
            # host address like any other; the old "10.0.0.256" made every 256th host's
            # connect a 400, so it never enrolled).
            address=str(FIRST_ADDRESS + i),
        )
    names = list(fleet.hosts)
    vw = _width(vms, 4)
    priorities = ("high", "medium", "low")
    n_ha = 0
    for i in range(vms):
        name = f"vm-{i + 1:0{vw}d}"
        home = names[i % hosts]
        ha = int((i + 1) * ha_ratio) > int(i * ha_ratio)
        spec = VmSpec(
            name=name,
            home=home,
            cpus=rng.choice((1, 2)),
            memory_mb=rng.choice((1024, 2048, 3072, 4096)),
            ha_enabled=ha,
            priority=priorities[n_ha % 3] if ha else "medium",
        )
        n_ha += ha
        fleet.vm_specs[name] = spec
        fleet.hosts[home].vms[name] = "PowerOn"
    return fleet
