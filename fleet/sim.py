"""An in-process simulated fleet: hypervisors, their agents, their BMCs.

`SimFleet` holds the truth about every simulated machine (powered? agent running?
network on? which VMs does its hypervisor know?). `SimAgentClient` and `SimOobClient`
expose it through the engine's transport interfaces (hosts.transport), exactly where
production uses HTTP agents and Redfish BMCs — so the scenario runner and tests run
the real engine against it. Faults use the scenario vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hosts.transport import AgentError, Unreachable


@dataclass
class SimHost:
    name: str
    cluster: str = "c1"
    cpus: int = 16
    memory_mb: int = 65536
    tags: list[str] = field(default_factory=list)
    type: str = "Routing"
    powered: bool = True
    agent_running: bool = True
    network_on: bool = True
    bmc_ok: bool = True
    bmc_off: bool = False  # the BMC answers and reports power Off (`host H bmc-off`)
    start_fail: int = 0
    vms: dict[str, str] = field(default_factory=dict)  # name → PowerOn/PowerOff

    @property
    def reachable(self) -> bool:
        """Can the management server talk to its agent?"""
        return self.powered and self.agent_running and self.network_on

    @property
    def agent_url(self) -> str:
        return f"sim://{self.name}"

    def report(self) -> list[tuple[str, str]]:
        return sorted(self.vms.items())


class SimFleet:
    def __init__(self) -> None:
        self.hosts: dict[str, SimHost] = {}
        self.calls: list[tuple[str, ...]] = []  # what the server asked, for tests

    def add_host(self, name: str, **kw) -> SimHost:
        h = SimHost(name=name, **kw)
        self.hosts[name] = h
        return h

    def host(self, name: str) -> SimHost:
        try:
            return self.hosts[name]
        except KeyError:
            raise KeyError(f"no simulated host {name!r}") from None

    # --- faults (scenario vocabulary) ----------------------------------------------
    def power_off(self, name: str) -> None:
        h = self.host(name)
        h.powered = False
        h.vms.clear()  # the machine dies; its VMs with it

    def power_on(self, name: str) -> None:
        h = self.host(name)
        h.powered = True
        h.agent_running = True
        h.vms.clear()  # it boots with no VM powered on

    def agent_stop(self, name: str) -> None:
        self.host(name).agent_running = False

    def agent_start(self, name: str) -> None:
        self.host(name).agent_running = True

    def network(self, name: str, on: bool) -> None:
        self.host(name).network_on = on

    def bmc(self, name: str, ok: bool) -> None:
        h = self.host(name)
        h.bmc_ok = ok
        if ok:
            h.bmc_off = False

    def bmc_reports_off(self, name: str) -> None:
        """`host H bmc-off`: the BMC answers and reports power Off (R27, R28) — the
        machine itself is not touched (a BMC pointed at the wrong system, or one
        that reports Off before the machine is really off)."""
        self.host(name).bmc_off = True

    def start_fail(self, name: str, n: int) -> None:
        self.host(name).start_fail = n

    def where(self, vm: str) -> list[str]:
        """Hosts whose hypervisor runs ``vm`` (powered on)."""
        return [h.name for h in self.hosts.values()
                if h.powered and h.vms.get(vm) == "PowerOn"]

    def vm_crash(self, vm: str) -> None:
        for h in self.hosts.values():
            if h.powered and h.vms.get(vm) == "PowerOn":
                h.vms[vm] = "PowerOff"

    def vm_vanish(self, vm: str) -> None:
        for h in self.hosts.values():
            h.vms.pop(vm, None)

    def double_runs(self) -> dict[str, list[str]]:
        """The invariant: VMs powered on on more than one host."""
        seen: dict[str, list[str]] = {}
        for h in self.hosts.values():
            if not h.powered:
                continue
            for vm, ps in h.vms.items():
                if ps == "PowerOn":
                    seen.setdefault(vm, []).append(h.name)
        return {vm: hs for vm, hs in seen.items() if len(hs) > 1}


class SimAgentClient:
    """AgentClient over the simulated fleet (see hosts.transport)."""

    def __init__(self, fleet: SimFleet):
        self.fleet = fleet

    def _reach(self, host) -> SimHost:
        h = self.fleet.hosts.get(host.name)
        if h is None or not h.reachable:
            raise Unreachable(f"{host.name} does not answer")
        return h

    def check_health(self, host) -> bool:
        self.fleet.calls.append(("check-health", host.name))
        try:
            self._reach(host)
        except Unreachable:
            return False
        return True

    def get_vm(self, host, vm_name: str):
        self.fleet.calls.append(("get-vm", host.name, vm_name))
        return self._reach(host).vms.get(vm_name)

    def start_vm(self, host, vm, definition=None) -> None:
        # A simulated hypervisor needs no definition (PROTOCOL.md v1.1): ignored.
        self.fleet.calls.append(("start", host.name, vm.name))
        h = self._reach(host)
        if h.start_fail > 0:
            h.start_fail -= 1
            raise AgentError(f"{host.name} refused to start {vm.name} (injected failure)", 500)
        h.vms[vm.name] = "PowerOn"

    def stop_vm(self, host, vm_name: str, force: bool = True) -> None:
        self.fleet.calls.append(("stop", host.name, vm_name))
        self._reach(host).vms.pop(vm_name, None)

    def migrate_vm(self, host, vm_name: str, target) -> str:
        self.fleet.calls.append(("migrate", host.name, vm_name, target.name))
        src = self._reach(host)
        dst = self._reach(target)
        if src.vms.get(vm_name) != "PowerOn":
            raise AgentError(f"{vm_name} is not running on {host.name}", 409)
        del src.vms[vm_name]
        dst.vms[vm_name] = "PowerOn"
        return target.name

    def check_on_host(self, neighbour, target):
        self.fleet.calls.append(("check-on-host", neighbour.name, target.name))
        self._reach(neighbour)
        t = self.fleet.hosts.get(target.name)
        if t is None:
            return None
        # Neighbours see the machine (storage heartbeat), not its agent.
        return t.powered


class SimOobClient:
    """OobClient over the simulated BMCs."""

    def __init__(self, fleet: SimFleet):
        self.fleet = fleet

    def power_state(self, host):
        h = self.fleet.hosts.get(host.name)
        if h is None or not h.bmc_ok:
            return None
        return "On" if h.powered and not h.bmc_off else "Off"

    def check_bmc(self, host):
        self.fleet.calls.append(("bmc-check", host.name))
        h = self.fleet.hosts.get(host.name)
        if h is None or not h.bmc_ok:
            return "BMC unreachable (simulated)"
        if self.power_state(host) == "Off":
            return "BMC reports power Off while the host should run"
        return None

    def power_off(self, host) -> bool:
        self.fleet.calls.append(("fence", host.name))
        h = self.fleet.hosts.get(host.name)
        if h is None or not h.bmc_ok:
            return False
        h.bmc_off = False  # the ForceOff reaches the machine itself
        self.fleet.power_off(host.name)
        return True
