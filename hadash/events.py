"""Events: every state change of a host, VM or HA item is written as an event row in
the same transaction as the change (SPEC §1), linked to its incident (R18) when it is
part of one. What needs an operator's attention is an alert (R19), kept in the alert
table by hadash.alerts — one per incident or per (kind, subject) — whose own changes
are events too (AlertOpened, AlertResolved: the only events flagged ``alert``)."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.utils import timezone


def record_event(subject: str, obj: Any = None, **fields):
    """Write one event (its fields as `event_values` takes them). Must run inside the
    transaction that makes the change (it refuses to run in autocommit, so a change can
    never lose its event)."""
    from .models import Event

    conn = transaction.get_connection()
    if not conn.in_atomic_block:
        raise RuntimeError("record_event must run inside the transaction of its change")
    return Event.objects.create(**event_values(subject, obj, **fields))


def event_values(
    subject: str,
    obj: Any = None,
    *,
    event: str,
    field: str = "",
    old: Any = "",
    new: Any = "",
    reason: str = "",
    message: str = "",
    alert: bool = False,
    severity: str | None = None,
    now=None,
    name: str | None = None,
    related_host=None,
    related_vm=None,
    incident=None,
) -> dict[str, Any]:
    """The fields of the event ``record_event`` writes (relations as model objects),
    for writers of many events at once (hadash.api.hostbulk), which must insert them in
    the transaction of their changes too."""
    from .choices import Severity

    subject_id = getattr(obj, "pk", None)
    subject_name = name if name is not None else (getattr(obj, "name", "") or str(obj or ""))
    if related_host is None and subject == "host":
        related_host = obj
    if related_vm is None and subject == "vm":
        related_vm = obj
    if related_host is None and subject == "vm" and obj is not None:
        related_host = getattr(obj, "host", None) or getattr(obj, "last_host", None)
    return dict(
        time=now or timezone.now(),
        subject=subject,
        subject_id=subject_id,
        subject_name=subject_name[:255],
        event=event,
        field=field,
        old=_text(old),
        new=_text(new),
        reason=reason or "",
        message=message[:2000],
        alert=alert,
        severity=severity or (Severity.CRITICAL if alert else Severity.INFO),
        host=related_host,
        vm=related_vm,
        # An incident row, or its id (an HA item's incident_id: not read to be linked).
        **({"incident_id": incident} if isinstance(incident, int) else {"incident": incident}),
    )


def _text(v: Any) -> str:
    if v is None:
        return ""
    return str(v)[:255]
