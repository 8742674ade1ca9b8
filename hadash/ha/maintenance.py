"""Maintenance (R15): prepare-for-maintenance migrates every running VM away; when
none is left the host is in Maintenance.

A failed migration — including "no host has room" — puts the host in
ErrorInMaintenance while its Migration work keeps retrying every
migrate.retry.interval; once no VM is left on it (and no migration is under way),
the host is in Maintenance, from PrepareForMaintenance or from ErrorInMaintenance.
Cancel-maintenance (hadash.ha.actions) sets Enabled and cancels the host's unfinished
Migration work (CloudStack cancelScheduledMigrations)."""

from __future__ import annotations

from hadash.choices import FINAL_STEPS, WorkType
from hadash.models import HaWork
from hosts.choices import ResourceState
from hosts.models import Host
from vms.choices import ACTIVE_STATES
from vms.models import VMInstance

# R15: a host in one of these is still being emptied; its Migration work goes on.
EMPTYING = (ResourceState.PREPARE_FOR_MAINTENANCE, ResourceState.ERROR_IN_MAINTENANCE)


def emptying(host: Host | None) -> bool:
    """Is ``host`` still being emptied for maintenance (its Migration work goes on)?"""
    return host is not None and host.resource_state in EMPTYING


def migration_failed(host: Host, *, now, why: str) -> bool:
    """R15: a failed migration of one of the host's VMs (``why`` says which and how)
    leaves the host in ErrorInMaintenance, with an alert. Only the first failure
    changes the state; the Migration work retries meanwhile. Call it inside the
    transaction that records the failure."""
    host.refresh_from_db()
    return host.set_resource_state(
        ResourceState.ERROR_IN_MAINTENANCE, now=now, alert=True,
        expect=(ResourceState.PREPARE_FOR_MAINTENANCE,), reason="migration failed",
        message=f"Host {host.name}: {why}; ErrorInMaintenance while its Migration work "
                "retries",
    )


def complete_if_ready(host: Host, *, now) -> bool:
    """R15: no VM left and no Migration work open → Maintenance (from
    PrepareForMaintenance or ErrorInMaintenance)."""
    host.refresh_from_db()
    if host.resource_state not in EMPTYING:
        return False
    if VMInstance.objects.filter(host=host, state__in=ACTIVE_STATES).exists():
        return False
    if HaWork.objects.filter(host=host, type=WorkType.MIGRATION).exclude(
        step__in=FINAL_STEPS
    ).exists():
        return False
    after_errors = host.resource_state == ResourceState.ERROR_IN_MAINTENANCE
    return host.set_resource_state(
        ResourceState.MAINTENANCE, now=now, expect=EMPTYING,
        reason="all VMs migrated",
        message=f"Host {host.name} is in Maintenance: no VM left on it"
                f"{' (after failed migrations)' if after_errors else ''}",
    )


def complete_ready_hosts(*, now) -> None:
    for host in Host.objects.filter(resource_state__in=EMPTYING):
        complete_if_ready(host, now=now)
