"""The server→host interfaces the engine talks through.

Production implements them over HTTP (`hosts.agent_http.HttpAgentClient`, PROTOCOL.md's
server→agent calls) and Redfish (`hosts.redfish.RedfishClient`); the scenario runner
implements them with an in-process simulated fleet (`fleet.sim`). The engine only ever
sees these methods, so both run the same HA code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from hosts.models import Host
    from vms.models import VMInstance


class Unreachable(Exception):
    """No answer in time (or no connection): the host cannot be asked."""


class AgentError(Exception):
    """The agent answered, and refused (409/500 with an `error`)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class AgentClient(Protocol):
    def check_health(self, host: Host) -> bool:
        """True when the host's agent answers `check-health`; False when unreachable."""

    def get_vm(self, host: Host, vm_name: str) -> str | None:
        """The VM's power state on that host (`PowerOn`/`PowerOff`), or None when the
        hypervisor does not know it (404). Raises Unreachable."""

    def start_vm(self, host: Host, vm: VMInstance,
                 definition: dict[str, str] | None = None) -> None:
        """Start the VM there. ``definition`` (PROTOCOL.md v1.1): the VM's stored
        definition, ``{"format": "libvirt-xml", "xml": …}``, sent when the server has
        one so the host can define the VM (a simulator ignores it). Raises AgentError
        (refused) or Unreachable."""

    def stop_vm(self, host: Host, vm_name: str, force: bool = True) -> None:
        """Stop the VM there; its hypervisor then forgets it. Raises AgentError or
        Unreachable."""

    def migrate_vm(self, host: Host, vm_name: str, target: Host) -> str:
        """Live-migrate the VM from ``host`` to ``target``; returns the target's name.
        Raises AgentError or Unreachable."""

    def check_on_host(self, neighbour: Host, target: Host) -> bool | None:
        """The neighbour's view of ``target``: True alive, False dead, None cannot
        tell. Raises Unreachable when the neighbour itself cannot be asked."""


class OobClient(Protocol):
    def power_state(self, host: Host) -> str | None:
        """The BMC's PowerState (`On`/`Off`), or None when unreachable/unconfigured."""

    def power_off(self, host: Host) -> bool:
        """Fence: ForceOff, then confirm the BMC reports Off. True only when it does."""

    def check_bmc(self, host: Host) -> str | None:
        """R28: None when the BMC answers, accepts the credentials and reports power
        On; else why not, in an operator's words ("unreachable: …", "credentials
        refused (HTTP 401)", "reports power Off"). Bounded by the client's timeouts."""
