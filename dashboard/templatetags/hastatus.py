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
