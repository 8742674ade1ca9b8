"""A race for placement tests: another VM takes a host right after the first ranking of
a restart, as a parallel worker's reservation would (R24: each placement of a batch
sees the ones before it)."""

from __future__ import annotations

from hosts.models import Host
from vms import placement
from vms.choices import VmState
from vms.models import VMInstance


def race_after_first_ranking(monkeypatch, *, vm: str, other: str, onto: str) -> list[str]:
    """Once ``vm`` has been ranked the first time, move ``other`` (Starting) onto host
    ``onto``. Returns a list that then holds the host ranked best at that moment."""
    real = placement.ranked
    raced: list[str] = []

    def ranked_then_race(v, **kw):
        found = real(v, **kw)
        if v.name == vm and not raced:
            raced.append(found[0].name)
            VMInstance.objects.filter(name=other).update(
                state=VmState.STARTING, host=Host.objects.get(name=onto))
        return found

    monkeypatch.setattr(placement, "ranked", ranked_then_race)
    return raced
