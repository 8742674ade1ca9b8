"""Alerts on the dashboard (R19): the overview's panel lists the open rows of the
``alert`` table — one per incident, updated as it progresses, and one per (kind,
subject) for the other conditions — and each disappears by itself when it resolves.
Admins acknowledge one (here or on its incident's page) or all the ones they saw,
after a confirmation naming how many.

``alerts.json`` is what the panel refetches (static/dashboard/alerts.js) when the live
relay brings events; the page itself is rendered with the same rows.
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Case, Count, IntegerField, Max, Q, Value, When
from django.http import HttpResponseNotAllowed, JsonResponse
from django.shortcuts import get_object_or_404, redirect
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from hadash import alerts as hadash_alerts
from hadash.choices import AlertState, Severity
from hadash.models import Alert

from .perms import admin_required, wants_json
from .templatetags.dash import subject_url

SHOWN = 50  # rows in the panel (the count says how many are open)

SEVERITY_ORDER = Case(
    When(severity=Severity.CRITICAL, then=Value(0)),
    When(severity=Severity.WARNING, then=Value(1)),
    default=Value(2), output_field=IntegerField(),
)


def open_alerts():
    """Open alerts as the panel lists them: unacknowledged first, then the most
    severe, then the newest."""
    return (Alert.objects.filter(state=AlertState.OPEN)
            .annotate(unacked=Case(When(acknowledged_at__isnull=True, then=Value(0)),
                                   default=Value(1), output_field=IntegerField()),
                      sev=SEVERITY_ORDER)
            .order_by("unacked", "sev", "-id"))


def counts() -> dict:
    """Open alerts, and how many of them nobody acknowledged yet (one query)."""
    c = Alert.objects.filter(state=AlertState.OPEN).aggregate(
        open=Count("id"), unacknowledged=Count("id", filter=Q(acknowledged_at__isnull=True)),
        top=Max("id"))
    return {"open": c["open"], "unacknowledged": c["unacknowledged"], "top": c["top"] or 0}


def url_of(alert: Alert) -> str:
    """Where the operator looks into it: its incident, else its subject."""
    if alert.incident_id:
        return reverse("dash:incident", args=[alert.incident_id])
    return subject_url({"subject": alert.subject, "subject_name": alert.subject_name})


def as_json(a: Alert) -> dict:
    return {
        "id": a.pk, "kind": a.kind, "severity": a.severity, "state": a.state,
        "title": a.title, "message": a.message, "count": a.count,
        "subject": a.subject, "subject_name": a.subject_name, "cluster": a.cluster,
        "incident": a.incident_id, "url": url_of(a),
        "opened_at": a.opened_at.isoformat(), "updated_at": a.updated_at.isoformat(),
        "acknowledged_at": a.acknowledged_at.isoformat() if a.acknowledged_at else None,
        "acknowledged_by": a.acknowledged_by,
    }


def panel() -> dict:
    """What the overview's alerts panel shows: the rows and the counts."""
    rows = list(open_alerts()[:SHOWN])
    for a in rows:
        a.url = url_of(a)
    if len(rows) < SHOWN:  # every open alert is here: count them without a query
        c = {"open": len(rows),
             "unacknowledged": sum(1 for a in rows if a.acknowledged_at is None),
             "top": max((a.pk for a in rows), default=0)}
    else:
        c = counts()
    return {"alerts": rows, "alert_counts": c}


@login_required
def alerts_json(request):
    p = panel()
    return JsonResponse({**p["alert_counts"], "shown": SHOWN,
                         "alerts": [as_json(a) for a in p["alerts"]]})


def back(request, fallback: str):
    target = request.POST.get("next") or request.headers.get("Referer") or fallback
    if not url_has_allowed_host_and_scheme(target, {request.get_host()},
                                           require_https=request.is_secure()):
        target = fallback
    return redirect(target)


@require_POST
@admin_required
def acknowledge(request, pk: int):
    """Acknowledge one alert (open or resolved: it only records who saw it)."""
    alert = get_object_or_404(Alert, pk=pk)
    n = hadash_alerts.acknowledge(Alert.objects.filter(pk=pk), by=request.user.get_username(),
                                  now=timezone.now())
    if wants_json(request):
        return JsonResponse({"ok": True, "id": pk, "acknowledged": n})
    messages.success(request, f"Alert acknowledged: {alert.title}" if n
                     else f"Alert already acknowledged: {alert.title}")
    return back(request, reverse("dash:overview"))


def _upto(value: str | None) -> int | None:
    try:
        n = int(value or "")
    except ValueError:
        return None
    return n if 0 <= n < 2**63 else None


def _to_acknowledge(upto: int):
    """Open, unacknowledged alerts the operator saw: ids up to ``upto`` (one raised
    meanwhile is not acknowledged unseen)."""
    return Alert.objects.filter(state=AlertState.OPEN, acknowledged_at__isnull=True,
                                id__lte=upto)


@login_required
def acknowledge_all(request):
    """GET: the confirmation page ("Acknowledge 5 open alerts?"), for browsers without
    the script that asks in place. POST (admins): acknowledge them."""
    if request.method not in ("GET", "HEAD", "POST"):
        return HttpResponseNotAllowed(["GET", "POST"])
    if request.method == "POST":
        return _acknowledge_all(request)
    upto = _upto(request.GET.get("upto"))
    if upto is None:
        upto = counts()["top"]
    from .views import page

    rows = list(_to_acknowledge(upto).order_by("-id")[:SHOWN])
    for a in rows:
        a.url = url_of(a)
    n = _to_acknowledge(upto).count()
    return page(request, "dashboard/alerts_ack_all.html", "ack-all",
                {"rows": rows, "n": n, "upto": upto})


@admin_required
def _acknowledge_all(request):
    upto = _upto(request.POST.get("upto"))
    if upto is None:
        message = "upto: the id of the newest alert you saw is needed (a whole number)"
        if wants_json(request):
            return JsonResponse({"error": message}, status=400)
        messages.error(request, message)
        return back(request, reverse("dash:overview"))
    n = hadash_alerts.acknowledge(_to_acknowledge(upto), by=request.user.get_username(),
                                  now=timezone.now())
    if wants_json(request):
        return JsonResponse({"ok": True, "acknowledged": n})
    messages.success(request, f"{n} alert(s) acknowledged.")
    return redirect(reverse("dash:overview"))
