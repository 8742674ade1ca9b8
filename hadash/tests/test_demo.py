"""`manage.py demo` (issue 3): what its banner tells a newcomer to try must show HA at
work."""

from fleet.simulator import demo_fleet
from hadash.management.commands.demo import Command


def test_suggested_fault_powers_off_a_host_that_runs_ha_vms():
    """The banner's example fault (`host H power off`) names a host with HA-enabled
    VMs, so following it shows VMs restarted elsewhere (R5/R12) — not just a host
    going Down with nothing to restart."""
    o = {"hosts": 20, "vms": 200, "ha_ratio": 0.5}
    victim = Command.host_with_ha_vms(o)
    fleet = demo_fleet(**o)
    on_victim = [s for s in fleet.vm_specs.values() if s.home == victim]
    assert on_victim and any(s.ha_enabled for s in on_victim)
    # No HA VMs at all: still a real host to name.
    assert Command.host_with_ha_vms({**o, "ha_ratio": 0.0}) in fleet.hosts
