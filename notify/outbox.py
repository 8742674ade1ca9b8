"""The outbox (SPEC R20): one ``Delivery`` per matching channel, written in the
transaction of the alert change that causes it (``hadash.alerts`` calls ``enqueue``).

No I/O here: the message is composed from the alert as it is now and stored; the
engine's sender (``notify.sender``) sends it after the commit. A rolled-back change
leaves no delivery; a committed one cannot lose its delivery, whatever crashes next.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid

from django.conf import settings
from django.db import transaction

from hadash.choices import AlertState, Severity, Transition

from .models import Channel, ChannelKind, Delivery

log = logging.getLogger("hadash.notify")

SEVERITY_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}

# Set after a commit that queued deliveries: the sender in this process sends at once
# instead of at its next poll.
due = threading.Event()

FIRING_STATUS = "firing"
RESOLVED_STATUS = "resolved"
RESOLVING = (Transition.RESOLVED, Transition.FAILED)


def matches(channel: Channel, alert) -> bool:
    """The channel's filter: enabled, at least its minimum severity, one of its kinds
    and clusters (an empty list: any)."""
    if not channel.enabled:
        return False
    if SEVERITY_RANK.get(alert.severity, 0) < SEVERITY_RANK.get(channel.min_severity, 0):
        return False
    if channel.kinds and alert.kind not in channel.kinds:
        return False
    return not (channel.clusters and alert.cluster not in channel.clusters)


def enqueue(alert, transition: str, *, now) -> list[Delivery]:
    """Queue ``transition`` of ``alert`` for every matching channel, in the caller's
    transaction."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("deliveries are queued in the transaction of their change")
    channels = [c for c in Channel.objects.filter(enabled=True) if matches(c, alert)]
    rows = [_delivery(c, alert, transition, now) for c in channels]
    if rows:
        Delivery.objects.bulk_create(rows)
        transaction.on_commit(due.set)
    return rows


def enqueue_test(channel: Channel, *, now, by: str = "") -> Delivery:
    """A ``test`` delivery to this channel, whatever its filter (and even disabled):
    "send test" (R20)."""
    from hadash.choices import Subject
    from hadash.events import record_event

    with transaction.atomic():
        delivery = _delivery(channel, None, Transition.TEST, now, by=by)
        delivery.save()
        record_event(Subject.CHANNEL, channel, event="NotificationTest", now=now,
                     message=f"test notification queued for channel {channel.name}"
                     + (f" by {by}" if by else ""))
        transaction.on_commit(due.set)
    return delivery


def _delivery(channel: Channel, alert, transition: str, now, by: str = "") -> Delivery:
    key = f"hadash-{uuid.uuid4().hex}"
    try:
        payload = compose(channel, alert, transition, now=now, key=key, by=by)
    except Exception:
        # A bug in composing must never undo the change it reports (an incident, an
        # HA step): send a plain message instead, and say so in the log.
        log.exception("composing notification %s for channel %s failed", transition,
                      channel.name)
        payload = fallback(alert, transition, now=now, key=key)
    return Delivery(channel=channel, alert=alert, transition=transition, idempotency_key=key,
                    payload=payload, next_attempt=now, created=now)


def fallback(alert, transition: str, *, now, key: str) -> dict:
    """A minimal message that every kind of channel can send."""
    title = " ".join(str(getattr(alert, "title", "") or "hadash notification").split())
    severity = str(getattr(alert, "severity", "") or Severity.INFO)
    return {"source": "hadash", "version": 1, "idempotency_key": key,
            "transition": transition, "time": _iso(now), "severity": severity,
            "alert": {"id": getattr(alert, "pk", None), "title": title},
            "subject": f"[hadash] {severity.upper()}: {title}"[:250],
            "text": f"{title}\n\nWhat happened: {transition}\n"}


# --- messages -----------------------------------------------------------------------


def public_url(path: str) -> str:
    """A link into the dashboard: absolute when HADASH_PUBLIC_URL is set."""
    return getattr(settings, "HADASH_PUBLIC_URL", "").rstrip("/") + path


def _iso(value) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def _test_alert(channel: Channel, now) -> dict:
    return {
        "id": None, "kind": "test", "subject": "channel", "subject_name": channel.name,
        "cluster": "", "severity": Severity.INFO, "state": AlertState.OPEN,
        "title": f"hadash test notification for channel {channel.name}",
        "message": "Sent by \"send test\": this channel works.", "count": 1,
        "opened_at": _iso(now), "updated_at": _iso(now), "resolved_at": None,
        "acknowledged": False,
    }


def alert_fields(alert) -> dict:
    return {
        "id": alert.pk, "kind": alert.kind, "subject": alert.subject,
        "subject_name": alert.subject_name, "cluster": alert.cluster,
        "severity": alert.severity, "state": alert.state, "title": alert.title,
        "message": alert.message, "count": alert.count,
        "opened_at": _iso(alert.opened_at), "updated_at": _iso(alert.updated_at),
        "resolved_at": _iso(alert.resolved_at),
        "acknowledged": alert.acknowledged_at is not None,
    }


def incident_fields(incident) -> dict | None:
    if incident is None:
        return None
    return {
        "id": incident.pk, "kind": incident.kind, "state": incident.state,
        "host": incident.host_name, "vm": incident.vm_name, "cluster": incident.cluster,
        "title": incident.title, "started_at": _iso(incident.started_at),
        "detected_at": _iso(incident.detected_at), "declared_at": _iso(incident.declared_at),
        "fenced_at": _iso(incident.fenced_at), "resolved_at": _iso(incident.resolved_at),
        "vms_affected": incident.vms_affected, "vms_restarted": incident.vms_restarted,
        "vms_failed": incident.vms_failed,
    }


def compose(channel: Channel, alert, transition: str, *, now, key: str, by: str = "") -> dict:
    """What this channel is sent: the JSON body (webhook, alertmanager) or the mail's
    subject and text (email)."""
    fields = alert_fields(alert) if alert is not None else _test_alert(channel, now)
    incident = incident_fields(getattr(alert, "incident", None)) if alert else None
    links = {"dashboard": public_url("/"),
             "incident": public_url(f"/incidents/{incident['id']}") if incident else None}
    if channel.kind == ChannelKind.ALERTMANAGER:
        return alertmanager_body(channel, fields, incident, transition, now=now,
                                 links=links)
    if channel.kind == ChannelKind.EMAIL:
        return email_message(fields, incident, transition, links=links, by=by)
    return {
        "source": "hadash", "version": 1, "idempotency_key": key,
        "transition": transition, "time": _iso(now), "severity": fields["severity"],
        "alert": fields, "incident": incident, "links": links,
    }


def alertmanager_name(kind: str) -> str:
    """Alert kind "host-down" → alertname "HadashHostDown"."""
    return "Hadash" + "".join(p[:1].upper() + p[1:] for p in
                              kind.replace("_", "-").replace(" ", "-").split("-") if p)


def fingerprint(fields: dict, channel: Channel) -> str:
    """Stable per alert (per channel for tests): Alertmanager receivers group and
    de-duplicate by it."""
    ident = f"alert:{fields['id']}" if fields["id"] else f"test:{channel.pk}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def alertmanager_body(channel: Channel, fields: dict, incident: dict | None,
                      transition: str, *, now, links: dict) -> dict:
    """Alertmanager's webhook body, version 4 (one alert per message)."""
    resolved = transition in RESOLVING or fields["state"] == AlertState.RESOLVED
    status = RESOLVED_STATUS if resolved else FIRING_STATUS
    labels = {"alertname": alertmanager_name(fields["kind"]),
              "severity": fields["severity"], "source": "hadash"}
    if fields["cluster"]:
        labels["cluster"] = fields["cluster"]
    if incident:
        if incident["host"]:
            labels["host"] = incident["host"]
        if incident["vm"]:
            labels["vm"] = incident["vm"]
        labels["incident"] = str(incident["id"])
    elif fields["subject"] == "host" and fields["subject_name"]:
        labels["host"] = fields["subject_name"]
    elif fields["subject"] == "vm" and fields["subject_name"]:
        labels["vm"] = fields["subject_name"]
    annotations = {"summary": fields["title"], "transition": transition}
    if fields["message"]:
        annotations["description"] = fields["message"]
    ends = (fields["resolved_at"] or _iso(now)) if resolved else "0001-01-01T00:00:00Z"
    alert = {
        "status": status, "labels": labels, "annotations": annotations,
        "startsAt": fields["opened_at"], "endsAt": ends,
        "generatorURL": links["incident"] or links["dashboard"],
        "fingerprint": fingerprint(fields, channel),
    }
    group = {"alertname": labels["alertname"]}
    return {
        "version": "4", "groupKey": f"{{}}:{{alertname=\"{labels['alertname']}\"}}",
        "truncatedAlerts": 0, "status": status, "receiver": channel.name,
        "groupLabels": group, "commonLabels": labels, "commonAnnotations": annotations,
        "externalURL": links["dashboard"], "alerts": [alert],
    }


TRANSITION_WORDS = {
    Transition.OPENED: "", Transition.DECLARED: " (declared Down)",
    Transition.FENCED: " (fenced)", Transition.FENCE_FAILED: " (fencing failed)",
    Transition.RESOLVED: "", Transition.FAILED: " (ended with VMs lost)",
    Transition.TEST: "",
}


def email_message(fields: dict, incident: dict | None, transition: str, *, links: dict,
                  by: str = "") -> dict:
    if transition == Transition.RESOLVED:
        label = "RESOLVED"
    elif transition == Transition.TEST:
        label = "TEST"
    else:
        label = str(fields["severity"]).upper()
    title = " ".join(str(fields["title"]).split())  # one line: a header never breaks
    subject = f"[hadash] {label}: {title}{TRANSITION_WORDS.get(transition, '')}"
    lines = [fields["title"], ""]
    if fields["message"]:
        lines += [fields["message"], ""]
    lines += [f"What happened: {transition}", f"Severity: {fields['severity']}",
              f"Alert: {fields['kind']} ({fields['subject']} {fields['subject_name']})".rstrip()]
    if fields["cluster"]:
        lines.append(f"Cluster: {fields['cluster']}")
    lines.append(f"Opened: {fields['opened_at']}")
    if fields["resolved_at"]:
        lines.append(f"Resolved: {fields['resolved_at']}")
    if incident:
        lines += ["", f"Incident #{incident['id']}: {incident['title']} ({incident['state']})",
                  f"VMs affected {incident['vms_affected']}, restarted "
                  f"{incident['vms_restarted']}, failed {incident['vms_failed']}"]
    if by:
        lines += ["", f"Test requested by {by}."]
    lines += ["", f"Dashboard: {links['incident'] or links['dashboard']}"]
    return {"subject": subject[:250], "text": "\n".join(lines) + "\n"}
