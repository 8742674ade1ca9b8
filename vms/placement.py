"""Placement (R13): an Up, Enabled host of the VM's cluster with free cpus and memory,
honouring ha.tag; among those the least loaded (fewest allocated cpus, then memory,
then host name)."""

from __future__ import annotations

from django.db.models import Sum

from hosts.choices import HostStatus, ResourceState
from hosts.models import Host

from .choices import ACTIVE_STATES
from .models import VMInstance


def allocations(host_ids=None) -> dict[int, tuple[int, int]]:
    """Allocated (cpus, memory_mb) per host id, from VMs that occupy capacity."""
    qs = VMInstance.objects.filter(state__in=ACTIVE_STATES, host__isnull=False)
    if host_ids is not None:
        qs = qs.filter(host_id__in=host_ids)
    rows = qs.values("host_id").annotate(c=Sum("cpus"), m=Sum("memory_mb"))
    return {r["host_id"]: (r["c"] or 0, r["m"] or 0) for r in rows}


def candidates(vm: VMInstance, *, ha: bool, ha_tag: str, cluster: str | None,
               exclude: tuple[int, ...] = (), only: tuple[int, ...] = ()) -> list[Host]:
    """Hosts that fit ``vm``, best first. ``ha`` selects the HA rule for ha.tag:
    HA restarts may only land on tagged hosts; ordinary placement avoids them."""
    hosts = Host.objects.filter(status=HostStatus.UP, resource_state=ResourceState.ENABLED)
    if cluster:
        hosts = hosts.filter(cluster=cluster)
    if exclude:
        hosts = hosts.exclude(pk__in=exclude)
    if only:
        hosts = hosts.filter(pk__in=only)
    hosts = list(hosts)
    if ha_tag:  # tags are matched exactly, in Python (databases differ on LIKE and case)
        hosts = [h for h in hosts if h.has_tag(ha_tag) == ha]
    used = allocations([h.pk for h in hosts])
    fitting = []
    for h in hosts:
        cpus, mem = used.get(h.pk, (0, 0))
        if h.cpus - cpus >= vm.cpus and h.memory_mb - mem >= vm.memory_mb:
            fitting.append((cpus, mem, h.name, h))
    fitting.sort(key=lambda t: t[:3])
    return [t[3] for t in fitting]


def pick_host(vm: VMInstance, *, ha: bool, ha_tag: str, cluster: str | None,
              exclude: tuple[int, ...] = ()) -> Host | None:
    found = candidates(vm, ha=ha, ha_tag=ha_tag, cluster=cluster, exclude=exclude)
    return found[0] if found else None
