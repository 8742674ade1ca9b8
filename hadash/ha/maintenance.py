"""Maintenance (R15): prepare-for-maintenance migrates every running VM away; when
none is left the host is in Maintenance.

A failed migration — including "no host has room" — puts the host in
ErrorInMaintenance while its Migration work keeps retrying every
migrate.retry.interval; once no VM is left on it (and no migration is under way),
the host is in Maintenance, from PrepareForMaintenance or from ErrorInMaintenance.
Cancel-maintenance (hadash.ha.actions) sets Enabled and cancels the host's unfinished
Migration work (CloudStack cancelScheduledMigrations)."""

from __future__ import annotations

from django.db import transaction

from hadash import alerts
from hadash.choices import FINAL_STEPS, Severity, Subject, WorkType
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
    text = (f"Host {host.name}: {why}; ErrorInMaintenance while its Migration work "
            "retries")
    if not host.set_resource_state(
        ResourceState.ERROR_IN_MAINTENANCE, now=now,
        expect=(ResourceState.PREPARE_FOR_MAINTENANCE,), reason="migration failed",
        message=text,
    ):
        return False
    # R19: one alert per host, resolved in Maintenance or by cancel-maintenance.
    alerts.open_alert(ERROR_IN_MAINTENANCE, Subject.HOST, host.name, now=now, host=host,
                      cluster=host.cluster or "", severity=Severity.WARNING,
                      title=f"{host.name}: migration failed, ErrorInMaintenance",
                      message=text)
    return True


ERROR_IN_MAINTENANCE = "ErrorInMaintenance"


def maintenance_over(host: Host, *, now, why: str) -> None:
    """R19: the host's ErrorInMaintenance alert, if open, resolves (in the caller's
    transaction: Maintenance reached, or maintenance cancelled)."""
    alerts.resolve_alert(ERROR_IN_MAINTENANCE, Subject.HOST, host.name, now=now,
                         message=f"{host.name}: {why}")


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
    with transaction.atomic():
        if not host.set_resource_state(
            ResourceState.MAINTENANCE, now=now, expect=EMPTYING,
            reason="all VMs migrated",
            message=f"Host {host.name} is in Maintenance: no VM left on it"
                    f"{' (after failed migrations)' if after_errors else ''}",
        ):
            return False
        if after_errors:
            maintenance_over(host, now=now, why="in Maintenance: no VM left on it")
    return True


def complete_ready_hosts(*, now) -> None:
    for host in Host.objects.filter(resource_state__in=EMPTYING):
        complete_if_ready(host, now=now)
