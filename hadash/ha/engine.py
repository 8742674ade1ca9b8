"""The engine context: a clock, the two ways of talking to hosts, and the sweep's
checks beyond single hosts.

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

    def cluster_checks(self, *, now, cfg) -> None:
        """What every monitor sweep does besides investigating hosts: engage or release
        mass-failure brakes (R14), finish maintenance of emptied hosts (R15), keep each
        cluster's failover plan current (R22: recomputed when its capacity changed). The sweep
        (hosts.liveness.monitor_step, the engine loop's) calls back here, so the domain
        code that sweeps hosts never imports the engine."""
        from clusters import plans
        from hadash.ha import brake, maintenance

        brake.update_all(now=now, cfg=cfg)
        maintenance.complete_ready_hosts(now=now)
        plans.refresh(now=now, cfg=cfg)

    def with_worker(self, worker_id: str) -> Engine:
        return Engine(agents=self.agents, oob=self.oob, clock=self.clock, worker_id=worker_id)
