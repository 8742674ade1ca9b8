"""The fleet simulator: many simulated hypervisor hosts in one process, speaking only
HTTP (and the websocket upgrade) to a hadash server — never its database.

Each host has PROTOCOL.md's agent (connect, pings with power reports, the server→agent
endpoints) and a Redfish BMC; faults use the scenario vocabulary and come from the
command line or the control API. Run it with ``python manage.py simulate``; see
docs/simulator.md.

Modules: :mod:`.state` (machines and faults, on :mod:`fleet.sim`), :mod:`.server`
(agents, BMCs, control API on one port), :mod:`.agents` (connect and ping loops),
:mod:`.api` (operator API registration), :mod:`.runner` (:class:`Simulator`),
:mod:`.control` (a client for the control API), :mod:`.pinger` (ping processes).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .runner import Options, Simulator, SimulatorThread
    from .state import FaultError, Fleet, demo_fleet, parse_fault

# Imported on first use, so that a ping process (:mod:`.pinger`) loads only the agent
# loops, not the server, the fault vocabulary and Django.
_LAZY = {"Options": ".runner", "Simulator": ".runner", "SimulatorThread": ".runner",
         "FaultError": ".state", "Fleet": ".state", "demo_fleet": ".state",
         "parse_fault": ".state"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FaultError", "Fleet", "Options", "Simulator", "SimulatorThread", "demo_fleet",
           "parse_fault"]
