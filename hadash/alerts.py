"""Alerts (R19): one per incident, updated as it progresses and resolved when it ends;
every other alert one per (kind, subject) while open, resolved by itself when its
condition clears. Each change is committed with its event (``Alert*``) and with the
notification deliveries it causes (R20, ``notify.outbox``), inside the caller's
transaction.

The domain (hosts/, vms/) and the engine (hadash.ha) both call these; they never
import the engine.
"""

from __future__ import annotations

from django.apps import apps
from django.db import IntegrityError, transaction

from .choices import AlertState, Severity, Subject, Transition
from .events import record_event
from .models import Alert

SEVERITY_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}


def key_of(kind: str, subject: str, name: str = "", incident=None) -> str:
    if incident is not None:
        return f"incident:{incident.pk}"
    return f"{kind}:{subject}:{name}"[:400]


def _in_transaction() -> None:
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("alerts change inside the transaction of their cause")


def open_alert(kind: str, subject: str, name: str = "", *, now, title: str,
               message: str = "", severity: str = Severity.WARNING, cluster: str = "",
               incident=None, host=None, vm=None) -> tuple[Alert, bool]:
    """Raise the alert for (kind, subject, name) — or for ``incident`` — or update the
    one already open (its title, message, severity; ``count`` + 1). Returns (alert,
    created). Notifies ``opened`` only when created."""
    _in_transaction()
    key = key_of(kind, subject, name, incident)
    alert = Alert.objects.select_for_update().filter(key=key, state=AlertState.OPEN).first()
    if alert is not None:
        _refresh(alert, now=now, title=title, message=message, severity=severity)
        return alert, False
    try:
        with transaction.atomic():
            alert = Alert.objects.create(
                kind=kind, subject=subject, subject_name=name[:255], key=key,
                incident=incident, cluster=cluster[:255], severity=severity,
                title=title[:255], message=message, opened_at=now, updated_at=now,
            )
    except IntegrityError:  # opened concurrently by another process: update that one
        alert = Alert.objects.select_for_update().get(key=key, state=AlertState.OPEN)
        _refresh(alert, now=now, title=title, message=message, severity=severity)
        return alert, False
    record_event(subject, None, name=name, event="AlertOpened", new=kind, now=now,
                 alert=True, severity=severity, message=title, related_host=host,
                 related_vm=vm, incident=incident)
    notify(alert, Transition.OPENED, now=now)
    return alert, True


def _refresh(alert: Alert, *, now, title: str, message: str, severity: str) -> None:
    alert.title, alert.message = title[:255], message
    alert.severity = severity
    alert.count += 1
    alert.updated_at = now
    alert.save(update_fields=["title", "message", "severity", "count", "updated_at"])


def update_incident_alert(incident, *, now, title: str, message: str = "",
                          severity: str | None = None,
                          transition: str | None = None) -> Alert | None:
    """Bring the incident's alert up to date (R19); notify ``transition`` (declared,
    fenced, fence-failed) when given."""
    _in_transaction()
    alert = Alert.objects.select_for_update().filter(
        key=key_of("", "", incident=incident), state=AlertState.OPEN).first()
    if alert is None:
        return None
    _refresh(alert, now=now, title=title, message=message,
             severity=severity or alert.severity)
    if transition:
        notify(alert, transition, now=now)
    return alert


def resolve_alert(kind: str = "", subject: str = "", name: str = "", *, now,
                  message: str = "", incident=None, failed: bool = False,
                  title: str = "") -> Alert | None:
    """Resolve the open alert for (kind, subject, name) or ``incident``, if any; notify
    ``resolved`` (``failed`` for an incident that ended with VMs lost)."""
    _in_transaction()
    key = key_of(kind, subject, name, incident)
    alert = Alert.objects.select_for_update().filter(key=key, state=AlertState.OPEN).first()
    if alert is None:
        return None
    alert.state = AlertState.RESOLVED
    alert.resolved_at = alert.updated_at = now
    if title:  # how it ended, when the title told a story still under way
        alert.title = title[:255]
    if message:  # the story so far, then how it ended
        alert.message = f"{alert.message}\n{message}" if alert.message else message
    alert.save(update_fields=["state", "resolved_at", "updated_at", "message", "title"])
    record_event(alert.subject, None, name=alert.subject_name, event="AlertResolved",
                 new=alert.kind, now=now, severity=Severity.INFO,
                 message=message or f"Resolved: {alert.title}", incident=incident)
    notify(alert, Transition.FAILED if failed else Transition.RESOLVED, now=now)
    return alert


def is_open(kind: str, subject: str, name: str = "") -> bool:
    return Alert.objects.filter(key=key_of(kind, subject, name),
                                state=AlertState.OPEN).exists()


def acknowledge(queryset, *, by: str, now) -> int:
    """Acknowledge alerts (open or not); returns how many were not acknowledged yet."""
    return queryset.filter(acknowledged_at__isnull=True).update(
        acknowledged_at=now, acknowledged_by=by[:150])


def notify(alert: Alert, transition: str, *, now) -> None:
    """R20: queue a delivery to every matching channel, in this transaction."""
    if not apps.is_installed("notify"):
        return
    from notify.outbox import enqueue

    enqueue(alert, transition, now=now)


__all__ = ["Subject", "open_alert", "update_incident_alert", "resolve_alert", "is_open",
           "acknowledge", "notify", "key_of", "SEVERITY_RANK"]
