"""Incidents (R18) and their alerts (R19): one failure story per host found behind on
ping, or per VM that powered off or went missing while Running.

Every function here runs inside the transaction of the change it records (the
detection's event, HostDown, a fence, an HA start, an item's end), so an incident never
disagrees with what happened. They are model-level, like hadash.models.HaWorkManager:
the domain (hosts.liveness, vms.powersync) and the engine (hadash.ha) both call them,
and this module never imports the engine.

Life of a host incident::

    behind on ping  → Open (started_at = last ping, detected_at), alert warning
    Alert status    → still Open, alert says why nothing is restarted
    HostDown        → Recovering (declared_at), one IncidentVm per VM on the host,
                      HA items and events linked, alert critical ("declared")
    fenced          → fenced_at (notified "fenced"); fence failed → notified
    each HA start   → the VM's running_at / target; first/last_restart_at
    all HA VMs done → Resolved (Failed when HA gave up on one), alert resolved
    back Up first   → Dismissed (nothing was done), alert resolved

A VM incident is the same with one VM: opened when a power report makes the engine
schedule an HA restart (VmPowerOff / VmReportMissing), Recovering once HA stopped it,
resolved when it runs again (or failed).
"""

from __future__ import annotations

from django.apps import apps
from django.db import IntegrityError, transaction

from .alerts import open_alert, resolve_alert, update_incident_alert
from .choices import (
    OPEN_INCIDENT_STATES,
    IncidentKind,
    IncidentState,
    Severity,
    Transition,
    VmOutcome,
)
from .models import Event, Incident, IncidentVm

HOST_ALERT = "HostIncident"
VM_ALERT = "VmIncident"
FINAL_OUTCOMES = (VmOutcome.RESTARTED, VmOutcome.FAILED, VmOutcome.NOT_HA,
                  VmOutcome.SETTLED, VmOutcome.OBSERVED)


def count(name: str, n: int = 1, **labels) -> None:
    """R21 counters (metrics.counters.inc), in the caller's transaction; nothing when
    the metrics app is not installed."""
    if apps.is_installed("metrics"):
        from metrics.counters import inc

        inc(name, n, **labels)


def _secs(a, b) -> str:
    return f"{int((a - b).total_seconds())} s" if a and b else "? s"


# --- host incidents ----------------------------------------------------------------------

def open_host_incident(host, *, now, started_at=None, why: str = "") -> Incident:
    """The host's open incident, or a new one (Open; its alert, warning) — ``why``
    when it was not found behind on ping (fenced for a VM). Idempotent: one open
    incident per host, by the database (incident_one_open_per_host)."""
    inc = Incident.objects.select_for_update(no_key=True).filter(
        kind=IncidentKind.HOST, host=host, state__in=OPEN_INCIDENT_STATES).first()
    if inc is not None:
        return inc
    started = started_at or host.last_ping
    try:
        with transaction.atomic():
            inc = Incident.objects.create(
                kind=IncidentKind.HOST, host=host, host_name=host.name,
                cluster=host.cluster or "", title=f"{host.name} {why or 'behind on ping'}",
                started_at=started, detected_at=now, updated=now,
            )
    except IntegrityError:  # opened by another process meanwhile
        return Incident.objects.select_for_update(no_key=True).get(
            kind=IncidentKind.HOST, host=host, state__in=OPEN_INCIDENT_STATES)
    behind = f"no ping for {_secs(now, started)}" if started else "no ping yet"
    open_alert(HOST_ALERT, "host", host.name, now=now, incident=inc, host=host,
               cluster=host.cluster or "", severity=Severity.WARNING,
               title=f"{host.name} {why}" if why else
               f"{host.name} behind on ping: investigating",
               message=f"Host {host.name}: {why}." if why else
               f"Host {host.name}: {behind}; investigating whether it is down.")
    return inc


def open_incident_of(host):
    return Incident.objects.filter(kind=IncidentKind.HOST, host=host,
                                   state__in=OPEN_INCIDENT_STATES).first()


def host_unreachable(host, *, now, why: str) -> Incident:
    """The host went to Alert (alive but not talking, or undeterminable): nothing is
    restarted; the incident stays Open and its alert says so."""
    inc = open_host_incident(host, now=now)
    _touch(inc, now)
    link_host_events(inc, host, now)
    update_incident_alert(
        inc, now=now, severity=Severity.WARNING,
        title=f"{host.name} unreachable: {why}; its VMs are not restarted",
        message=f"Host {host.name} is in Alert ({why}). Its VMs may still run, so HA "
                "restarts none of them; it is investigated again until it pings or is "
                "found Down.")
    return inc


def host_fenced(host, *, now, by: str = "") -> Incident:
    """An out-of-band power off succeeded (R12.2): fenced_at, notified "fenced"."""
    inc = open_host_incident(host, now=now, why=f"fenced{' for ' + by if by else ''}")
    if inc.fenced_at is None:
        inc.fenced_at = now
    _touch(inc, now, "fenced_at")
    update_incident_alert(
        inc, now=now, severity=Severity.CRITICAL, transition=Transition.FENCED,
        title=f"{host.name} fenced{' for ' + by if by else ''}",
        message=f"Host {host.name} was powered off out of band so that its VMs can be "
                "restarted elsewhere without running twice.")
    count("fences", outcome="ok")
    return inc


def fence_failed(host, *, now, why: str, incident=None) -> Incident | None:
    """Fencing failed: the VMs wait (never started while the host might run them);
    the host's incident (or the item's) says so, notified "fence-failed"."""
    inc = open_incident_of(host) or incident
    count("fences", outcome="failed")
    if inc is None or not inc.is_open:
        return None
    _touch(inc, now)
    update_incident_alert(
        inc, now=now, severity=Severity.CRITICAL, transition=Transition.FENCE_FAILED,
        title=f"Fencing {host.name} failed: its VMs wait",
        message=f"Fencing {host.name} failed ({why}). Its VMs are not restarted while it "
                "might still run them; fencing is tried again.")
    return inc


def host_declared_down(host, *, now, by: str, vms, items, ha) -> Incident:
    """HostDown (R5), in its transaction: Recovering, declared_at, one IncidentVm per
    VM that was on the host (``vms``; ``ha(vm)`` says whether HA restarts it), the
    HA items (``items``) and the HostDown/HaScheduled events linked; the alert turns
    critical and is notified "declared". No HA VM → Resolved at once."""
    inc = open_host_incident(host, now=now)
    inc.declared_at = inc.declared_at or now
    inc.state = IncidentState.RECOVERING
    inc.title = f"{host.name} down"
    confirmed = host.last_ping
    ha_names = []
    # One row per VM not in the incident yet: two queries for the host's VMs, not two
    # each (this runs in the HostDown transaction the HA workers wait for).
    known = set(IncidentVm.objects.filter(incident=inc).values_list("vm_name", flat=True))
    rows = []
    for vm in vms:
        wanted = bool(ha(vm))
        if wanted:
            ha_names.append(vm.name)
        if vm.name in known:
            continue
        known.add(vm.name)
        down_since = max([t for t in (confirmed, vm.power_state_update_time) if t],
                         default=None)
        rows.append(IncidentVm(
            incident=inc, vm_name=vm.name, vm=vm, ha=wanted, down_since=down_since,
            outcome=VmOutcome.PENDING if wanted else VmOutcome.NOT_HA,
            detail="" if wanted else "not HA-enabled: stays Stopped"))
    if rows:
        IncidentVm.objects.bulk_create(rows)
    inc.vms_affected = IncidentVm.objects.filter(incident=inc, ha=True).count()
    inc.updated = now
    inc.save(update_fields=["declared_at", "state", "title", "vms_affected", "updated"])
    item_ids = [i.pk for i in items]
    from .models import HaWork

    if item_ids:
        HaWork.objects.filter(pk__in=item_ids, incident__isnull=True).update(incident=inc)
    link_host_events(inc, host, now)
    names = ", ".join(ha_names) if ha_names else "none"
    update_incident_alert(
        inc, now=now, severity=Severity.CRITICAL, transition=Transition.DECLARED,
        title=f"{host.name} declared Down ({by or 'investigation'}): "
              f"{len(ha_names)} HA VM(s) to restart",
        message=f"Host {host.name} is Down ({by or 'investigation'}); {len(vms)} VM(s) on "
                f"it; HA VMs to restart: {names}.")
    complete(inc, now=now)
    return inc


def link_host_events(inc: Incident, host, now) -> None:
    """Link the events about ``host`` stamped ``now`` (written by Host.transition and
    the scheduling of its VMs, in this transaction) to its incident."""
    Event.objects.filter(host=host, time=now, incident__isnull=True).update(incident=inc)


def host_back(host, *, now, how: str) -> Incident | None:
    """The host is Up and on time again. An incident not yet declared is Dismissed
    (nothing was done); a declared one goes on until its VMs are settled."""
    inc = Incident.objects.select_for_update(no_key=True).filter(
        kind=IncidentKind.HOST, host=host, state=IncidentState.OPEN).first()
    if inc is None:
        return None
    inc.state = IncidentState.DISMISSED
    inc.resolved_at = inc.updated = now
    inc.save(update_fields=["state", "resolved_at", "updated"])
    resolve_alert(now=now, incident=inc, title=f"{host.name} back: nothing was done",
                  message=f"{host.name} is back ({how}) after "
                          f"{_secs(now, inc.detected_at)}; nothing was done")
    return inc


def dismiss_returned_hosts(*, now, cutoff) -> int:
    """Sweep-time catch-up (one query when nothing to do): Open host incidents whose
    host is Up and pinged since ``cutoff`` (it is on time again — a ping that needed
    no status change carries no hook) are Dismissed."""
    from hosts.choices import HostStatus

    returned = list(Incident.objects.filter(
        kind=IncidentKind.HOST, state=IncidentState.OPEN, host__status=HostStatus.UP,
        host__last_ping__gte=cutoff).select_related("host"))
    for inc in returned:
        with transaction.atomic():
            host_back(inc.host, now=now, how="pinging again")
    return len(returned)


def returned_pending(*, cutoff) -> bool:
    """Whether dismiss_returned_hosts has something to do (hadash.ha.due)."""
    from hosts.choices import HostStatus

    return Incident.objects.filter(
        kind=IncidentKind.HOST, state=IncidentState.OPEN, host__status=HostStatus.UP,
        host__last_ping__gte=cutoff).exists()


# --- VM incidents --------------------------------------------------------------------

def open_vm_incident(vm, item, *, now, started_at, why: str) -> Incident:
    """A VM powered off or went missing while Running and HA scheduled ``item`` for
    it: a VM incident (Open), its one IncidentVm, the item linked, its alert."""
    inc = Incident.objects.select_for_update(no_key=True).filter(
        kind=IncidentKind.VM, vm=vm, state__in=OPEN_INCIDENT_STATES).first()
    if inc is None:
        host = vm.host
        try:
            with transaction.atomic():
                inc = Incident.objects.create(
                    kind=IncidentKind.VM, vm=vm, vm_name=vm.name, host=host,
                    host_name=host.name if host else "", cluster=vm.cluster or "",
                    title=f"{vm.name} {why}", started_at=started_at, detected_at=now,
                    vms_affected=1, updated=now,
                )
        except IntegrityError:
            inc = Incident.objects.select_for_update(no_key=True).get(
                kind=IncidentKind.VM, vm=vm, state__in=OPEN_INCIDENT_STATES)
        else:
            IncidentVm.objects.create(incident=inc, vm=vm, vm_name=vm.name, ha=True,
                                      down_since=started_at)
            where = f" on {host.name}" if host else ""
            open_alert(VM_ALERT, "vm", vm.name, now=now, incident=inc, vm=vm, host=host,
                       cluster=vm.cluster or "", severity=Severity.WARNING,
                       title=f"{vm.name} {why}{where}: restarting",
                       message=f"VM {vm.name} {why}{where} while Running; HA is restarting "
                               "it.")
    if item is not None and item.incident_id is None:
        from .models import HaWork

        HaWork.objects.filter(pk=item.pk).update(incident=inc)
        item.incident = inc
        Event.objects.filter(subject="work", subject_id=item.pk,
                             incident__isnull=True).update(incident=inc)
    return inc


def vm_stopped_by_ha(item, *, now) -> None:
    """HA found the VM dead and stopped it: its VM incident is Recovering."""
    if not item.incident_id:
        return
    Incident.objects.filter(pk=item.incident_id, kind=IncidentKind.VM,
                            state=IncidentState.OPEN).update(
        state=IncidentState.RECOVERING, declared_at=now, updated=now)


# --- VMs of incidents ------------------------------------------------------------------

def _pending_rows(vm_id):
    return (IncidentVm.objects.select_related("incident")
            .filter(vm_id=vm_id, outcome=VmOutcome.PENDING,
                    incident__state__in=OPEN_INCIDENT_STATES))


def vm_restarted(item, vm, target, *, now):
    """An HA start succeeded (R12.5): the VM's downtime ends now; its incident(s)
    count the restart, and end when every HA VM is settled.

    The VM's own rows are written at once; the incident rows are counted by the
    returned function, which the caller runs as the last statement of its
    transaction: the incident row is locked until commit, and every HA worker
    restarting a VM of one failed host (a rack: 100 at a time) needs it, so it is held
    for the commit only, not for the rest of the step."""
    count("restarts", outcome="ok")
    link = item.incident_id if item is not None else None
    touched: list[int] = []
    for row in _pending_rows(vm.pk):
        link = link or row.incident_id
        row.outcome, row.running_at = VmOutcome.RESTARTED, now
        row.target_host_name = target.name if target else ""
        row.detail = f"restarted on {row.target_host_name}"
        row.save(update_fields=["outcome", "running_at", "target_host_name", "detail"])
        touched.append(row.incident_id)
    if link and not (item is not None and item.incident_id):
        # An item of an incident wrote its events linked (hadash.ha.work.mark_vm).
        Event.objects.filter(vm=vm, time=now, incident__isnull=True).update(incident=link)

    def count_restarts() -> None:
        for incident_id in sorted(set(touched)):
            # Read under the row lock: concurrent workers restarting VMs of one
            # incident (a failed host's) otherwise lost each other's counts. FOR NO KEY
            # UPDATE: the deferred foreign-key checks of other workers' commits take
            # FOR KEY SHARE on this row; with FOR UPDATE taken this late they deadlock.
            inc = Incident.objects.select_for_update(no_key=True).get(pk=incident_id)
            inc.first_restart_at = inc.first_restart_at or now
            inc.last_restart_at = now
            inc.vms_restarted += touched.count(incident_id)
            _touch(inc, now, "first_restart_at", "last_restart_at", "vms_restarted")
            complete(inc, now=now)

    return count_restarts


def restart_failed(item, vm, *, now, error: str) -> None:
    """One start attempt failed (retried with back-off): counted (R21)."""
    count("restarts", outcome="failed")


def item_ended(item, step: str, *, now, message: str = "") -> None:
    """An HA item ended without restarting its VM (R12.1 changed meanwhile, alive,
    not HA-enabled, cancelled by an operator → settled; Error → failed). The VM's
    pending rows in open incidents take that outcome; incidents may end."""
    from vms.choices import VmState
    from vms.models import VMInstance

    from .choices import Step

    rows = list(_pending_rows(item.instance_id))
    if not rows:
        return
    vm = VMInstance.objects.filter(pk=item.instance_id).first()
    running = vm is not None and vm.state == VmState.RUNNING
    for row in rows:
        if step == Step.ERROR:
            row.outcome = VmOutcome.FAILED
        else:
            row.outcome = VmOutcome.SETTLED
            if running:
                row.running_at = now
                row.target_host_name = vm.host.name if vm.host_id else ""
        row.detail = message[:500]
        row.save(update_fields=["outcome", "running_at", "target_host_name", "detail"])
        inc = Incident.objects.select_for_update(no_key=True).get(pk=row.incident_id)
        if row.outcome == VmOutcome.FAILED:
            inc.vms_failed += 1
            _touch(inc, now, "vms_failed")
            if not complete(inc, now=now):
                update_incident_alert(inc, now=now, severity=Severity.CRITICAL,
                                      title=f"{inc.title}: HA gave up on {row.vm_name}",
                                      message=message)
        else:
            complete(inc, now=now)


def complete(inc: Incident, *, now) -> bool:
    """End the incident when every HA VM of it is settled: Resolved, or Failed when HA
    gave up on one; its alert resolved (failed=True for Failed). A host incident
    ends only once declared."""
    if not inc.is_open:
        return False
    if inc.kind == IncidentKind.HOST and inc.declared_at is None:
        return False
    if IncidentVm.objects.filter(incident=inc, ha=True, outcome=VmOutcome.PENDING).exists():
        return False
    failed = IncidentVm.objects.filter(incident=inc, ha=True,
                                       outcome=VmOutcome.FAILED).count()
    inc.state = IncidentState.FAILED if failed else IncidentState.RESOLVED
    inc.resolved_at = inc.updated = now
    inc.save(update_fields=["state", "resolved_at", "updated"])
    took = _secs(now, inc.started_at or inc.detected_at)
    if failed:
        text = (f"{inc.title}: HA gave up on {failed} of {inc.vms_affected} VM(s); "
                f"{inc.vms_restarted} restarted")
    elif inc.vms_affected == 0:
        text = f"{inc.title}: no HA VM to restart"
    else:
        text = f"{inc.title}: {inc.vms_restarted} of {inc.vms_affected} HA VM(s) running " \
               f"again after {took}"
    if failed:
        title = f"{inc.title}: HA gave up on {failed} VM(s)"
    elif inc.vms_affected:
        title = f"{inc.title}: {inc.vms_restarted} VM(s) running again"
    else:
        title = f"{inc.title}: nothing to restart"
    resolve_alert(now=now, incident=inc, message=text, failed=bool(failed), title=title)
    return True


def _touch(inc: Incident, now, *fields) -> None:
    inc.updated = now
    inc.save(update_fields=["updated", *fields])


__all__ = [
    "open_host_incident", "host_unreachable", "host_fenced", "fence_failed",
    "host_declared_down", "host_back", "dismiss_returned_hosts", "returned_pending",
    "open_vm_incident", "vm_stopped_by_ha", "vm_restarted", "restart_failed",
    "item_ended", "complete", "count", "HOST_ALERT", "VM_ALERT",
]
