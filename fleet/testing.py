"""Test helper: a simulated world (fleet + engine + virtual clock) in the current
test database, built from the scenario format and driven second by second.

    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {"vm1": {"host": "h1", "ha": True}}})
    w.fleet.power_off("h1")
    w.advance_to(60)

`w.engine` is the real engine on the simulated fleet; `w.fleet.calls` records what
the server asked the agents and BMCs.
"""

from __future__ import annotations

import copy

from .scenario import Run


def world(spec: dict) -> Run:
    data = copy.deepcopy(spec)
    data.setdefault("vms", {})
    data.setdefault("events", [])
    data.setdefault("expect", [])
    data.setdefault("config", {})
    data["events"] = sorted(data["events"], key=lambda e: e["at"])
    w = Run(data, "<test>")
    w.setup()
    return w
