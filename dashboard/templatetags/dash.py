"""Template helpers for the dashboard: links for event subjects, ages, durations."""

from __future__ import annotations

import datetime as dt
from urllib.parse import quote

from django import template
from django.urls import reverse
from django.utils import timezone

register = template.Library()


def _get(obj, name, default=None):
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


@register.filter
def subject_url(ev) -> str:
    """Where an event's subject lives on the dashboard ("" when nowhere)."""
    subject, name = _get(ev, "subject"), _get(ev, "subject_name") or ""
    if not name:
        return ""
    if subject == "host":
        return reverse("dash:host", args=[name])
    if subject in ("vm", "work"):
        return reverse("dash:vm", args=[name])
    if subject == "config":
        return reverse("dash:config") + "#cfg-" + quote(name)
    return ""


@register.filter
def duration(seconds) -> str:
    """Seconds as a short human duration: 42 s, 3 min 5 s, 2 h 10 min."""
    if seconds is None or seconds == "":
        return "—"
    s = float(seconds)
    neg = s < 0
    s = abs(s)
    if s < 10 and not s.is_integer():
        text = f"{s:.1f} s"
    elif s < 60:
        text = f"{int(round(s))} s"
    elif s < 3600:
        m, r = divmod(int(round(s)), 60)
        text = f"{m} min {r} s" if r else f"{m} min"
    elif s < 86400:
        h, r = divmod(int(round(s)), 3600)
        text = f"{h} h {r // 60} min" if r // 60 else f"{h} h"
    else:
        d, r = divmod(int(round(s)), 86400)
        text = f"{d} d {r // 3600} h" if r // 3600 else f"{d} d"
    return ("−" if neg else "") + text


@register.filter
def ago(when) -> str:
    """"12 s ago" / "in 30 s" for a datetime (— when unset)."""
    if not when:
        return "—"
    secs = (timezone.now() - when).total_seconds()
    if secs >= 0:
        return f"{duration(secs)} ago"
    return f"in {duration(-secs)}"


@register.filter
def since(when, start) -> str:
    """The time from ``start`` to ``when`` as "+12 s"."""
    if not when or not start:
        return ""
    return "+" + duration((when - start).total_seconds())


@register.filter
def iso(when) -> str:
    return when.isoformat() if isinstance(when, dt.datetime) else ""


@register.filter
def get(mapping, key):
    try:
        return mapping.get(key)
    except AttributeError:
        return None
