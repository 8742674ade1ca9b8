"""Maintenance (R15): prepare-for-maintenance migrates every running VM away; when
none is left the host is in Maintenance."""

from __future__ import annotations

from hadash.choices import FINAL_STEPS, WorkType
from hadash.models import HaWork
from hosts.choices import ResourceState
from hosts.models import Host
from vms.choices import ACTIVE_STATES
from vms.models import VMInstance


def complete_if_ready(host: Host, *, now) -> bool:
    host.refresh_from_db()
    if host.resource_state != ResourceState.PREPARE_FOR_MAINTENANCE:
        return False
    if VMInstance.objects.filter(host=host, state__in=ACTIVE_STATES).exists():
        return False
    if HaWork.objects.filter(host=host, type=WorkType.MIGRATION).exclude(
        step__in=FINAL_STEPS
    ).exists():
        return False
    return host.set_resource_state(
        ResourceState.MAINTENANCE, now=now, expect=(ResourceState.PREPARE_FOR_MAINTENANCE,),
        reason="all VMs migrated",
        message=f"Host {host.name} is in Maintenance: no VM left on it",
    )


def complete_ready_hosts(*, now) -> None:
    for host in Host.objects.filter(resource_state=ResourceState.PREPARE_FOR_MAINTENANCE):
        complete_if_ready(host, now=now)
