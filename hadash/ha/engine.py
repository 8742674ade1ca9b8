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

from .oobcheck import BmcChecker

# R28: BMC checks run beside the sweep on this many threads (production).
BMC_CHECK_THREADS = 8


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Engine:
    agents: AgentClient
    oob: OobClient
    clock: object = field(default_factory=SystemClock)
    worker_id: str = field(default_factory=default_worker_id)
    # R28: the sweeper's BMC check round (inline unless given an executor).
    bmc_checks: BmcChecker = field(default_factory=BmcChecker)

    def now(self):
        return self.clock.now()

    @classmethod
    def production(cls, worker_id: str | None = None) -> Engine:
        from concurrent.futures import ThreadPoolExecutor

        from hosts.agent_http import HttpAgentClient
        from hosts.redfish import RedfishClient

        return cls(
            agents=HttpAgentClient(),
            oob=RedfishClient(),
            worker_id=worker_id or default_worker_id(),
            # Threads start only when a check is submitted: only the sweeper's do.
            bmc_checks=BmcChecker(ThreadPoolExecutor(BMC_CHECK_THREADS,
                                                     thread_name_prefix="bmc-check")),
        )

    def cluster_checks(self, *, now, cfg) -> None:
        """What every monitor sweep does besides investigating hosts: engage or release
        mass-failure brakes (R14), finish maintenance of emptied hosts (R15), keep each
        cluster's failover plan current (R22: recomputed when its capacity changed), keep
        the HA mode alerts in line with the modes in force and re-examine everything when
        HA is armed again (R26), and start the BMC checks that are due (R28, never
        waited for). The sweep (hosts.liveness.monitor_step, the engine loop's) calls back
        here, so the domain code that sweeps hosts never imports the engine."""
        from clusters import plans
        from hadash.ha import brake, maintenance, modes

        brake.update_all(now=now, cfg=cfg)
        maintenance.complete_ready_hosts(now=now)
        plans.refresh(now=now, cfg=cfg)
        modes.reconcile(now=now, cfg=cfg)
        self.bmc_checks.run_due(self, now=now, cfg=cfg)

    def with_worker(self, worker_id: str) -> Engine:
        return Engine(agents=self.agents, oob=self.oob, clock=self.clock, worker_id=worker_id,
                      bmc_checks=self.bmc_checks)
