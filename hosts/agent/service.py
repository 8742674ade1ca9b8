"""Agent protocol, server side: what connect, ping and disconnect do (R1, R6–R8).

The HTTP views (and the websocket consumer, and the scenario runner) validate their
input first and then call these functions with clean data; nothing here parses JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ConnectData:
    name: str
    type: str
    hypervisor: str
    cluster: str
    cpus: int
    memory_mb: int
    address: str
    agent_url: str
    vms: list[tuple[str, str]] = field(default_factory=list)  # (vm name, PowerOn/PowerOff)
