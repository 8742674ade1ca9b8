"""HA status (SPEC R17) on a detail page: ``{% load hastatus %}{% ha_status host %}`` or
``{% ha_status vm %}`` computes the one object's status (hosts.hastatus /
vms.hastatus) and renders dashboard/_ha_status.html. Lists compute a page at once with
``statuses_for`` and include the template themselves."""

from __future__ import annotations

from django import template
from django.utils import timezone

from hosts import hastatus as host_hastatus
from hosts.models import Host
from vms import hastatus as vm_hastatus

register = template.Library()


@register.inclusion_tag("dashboard/_ha_status.html")
def ha_status(obj, compact=False):
    mod = host_hastatus if isinstance(obj, Host) else vm_hastatus
    return {"status": mod.status_of(obj, now=timezone.now()), "compact": compact}


@register.simple_tag
def ha_statuses(rows):
    """HA statuses of a list of hosts or VMs (one kind), computed for the whole list in a
    fixed number of queries: ``{% ha_statuses vms as statuses %}``, then per row
    ``{% include "dashboard/_ha_status.html" with status=statuses|get:v.pk compact=1 %}``
    (``get`` from the dash tags)."""
    rows = list(rows)
    if not rows:
        return {}
    mod = host_hastatus if isinstance(rows[0], Host) else vm_hastatus
    return mod.statuses_for(rows, now=timezone.now())
