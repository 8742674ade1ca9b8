"""The engine context: a clock and the two ways of talking to hosts.

Every sweep and worker step takes an Engine, so the same code runs in production
(system clock, HTTP agents, Redfish BMCs) and in tests and scenarios (virtual clock,
in-process simulated fleet).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from hadash.clock import SystemClock
from hosts.transport import AgentClient, OobClient


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Engine:
    agents: AgentClient
    oob: OobClient
    clock: object = field(default_factory=SystemClock)
    worker_id: str = field(default_factory=default_worker_id)

    def now(self):
        return self.clock.now()

    @classmethod
    def production(cls, worker_id: str | None = None) -> Engine:
        from hosts.agent_http import HttpAgentClient
        from hosts.redfish import RedfishClient

        return cls(
            agents=HttpAgentClient(),
            oob=RedfishClient(),
            worker_id=worker_id or default_worker_id(),
        )

    def with_worker(self, worker_id: str) -> Engine:
        return Engine(agents=self.agents, oob=self.oob, clock=self.clock, worker_id=worker_id)
