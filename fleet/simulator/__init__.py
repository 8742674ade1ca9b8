"""The fleet simulator: many simulated hypervisor hosts in one process, speaking only
HTTP (and the websocket upgrade) to a hadash server — never its database.

Each host has PROTOCOL.md's agent (connect, pings with power reports, the server→agent
endpoints) and a Redfish BMC; faults use the scenario vocabulary and come from the
command line or the control API. Run it with ``python manage.py simulate``; see
docs/simulator.md.

Modules: :mod:`.state` (machines and faults, on :mod:`fleet.sim`), :mod:`.server`
(agents, BMCs, control API on one port), :mod:`.agents` (connect and ping loops),
:mod:`.api` (operator API registration), :mod:`.runner` (:class:`Simulator`),
:mod:`.control` (a client for the control API).
"""

from .runner import Options, Simulator, SimulatorThread
from .state import FaultError, Fleet, demo_fleet, parse_fault

__all__ = ["FaultError", "Fleet", "Options", "Simulator", "SimulatorThread", "demo_fleet",
           "parse_fault"]
