"""Relative times that tick (issue 10 item 7): the server renders the text once and
puts the ISO timestamp in a data attribute; static/dashboard/ticks.js rewrites the
text every second from it.

``{% ago when %}``   → <time data-ago="ISO">25 s ago</time>
``{% until when %}`` → <time data-until="ISO">in 42 s</time>, "due" once it has passed
"""

from __future__ import annotations

from django import template
from django.utils import timezone
from django.utils.html import format_html

from .dash import duration, iso

register = template.Library()


@register.simple_tag
def ago(when, empty: str = "—"):
    if not when:
        return empty
    secs = (timezone.now() - when).total_seconds()
    text = f"{duration(max(0, int(secs)))} ago" if secs >= -1 else f"in {duration(int(-secs))}"
    return format_html('<time class="tick" datetime="{0}" title="{0}" data-ago="{0}">{1}</time>',
                       iso(when), text)


@register.simple_tag
def until(when, empty: str = "—"):
    if not when:
        return empty
    secs = (when - timezone.now()).total_seconds()
    text = f"in {duration(int(secs))}" if secs >= 1 else "due"
    return format_html('<time class="tick" datetime="{0}" title="{0}" data-until="{0}">{1}</time>',
                       iso(when), text)
