"""The failover plan's line on a host page (R22): "if this host fails: …"."""

from __future__ import annotations

from django import template
from django.db.models.fields.json import KeyTextTransform, KeyTransform
from django.utils import timezone

register = template.Library()


@register.simple_tag
def host_plan(host) -> dict | None:
    """The stored plan's entry for ``host``: one query reading only its own keys
    (a cluster's plan can be large). None when the cluster has no plan yet and none can
    be computed."""
    from clusters import plans
    from clusters.models import FailoverPlan

    def read():
        return FailoverPlan.objects.filter(cluster=host.cluster).values(
            "cluster", "capacity", "level", "computed_at",
            summary=KeyTextTransform(host.name, "summaries"),
            placements=KeyTransform(host.name, "plan"),
        ).first()

    row = read()
    if row is None:
        if plans.current(host.cluster, now=timezone.now()) is None:
            return None
        row = read()
    placements = row["placements"] or {}
    if isinstance(placements, str):  # some backends hand the JSON back as text
        import json

        placements = json.loads(placements)
    row["placements"] = sorted(placements.items())
    row["fits"] = all(t for _, t in row["placements"])
    row["below_level"] = row["capacity"] < row["level"]
    return row


@register.simple_tag
def evacuation_preview(host) -> dict:
    """Before maintenance is confirmed (R15 with R24): where each running VM of ``host``
    would migrate and what would not fit — vms.failover.preview_evacuation — with a
    one-line summary ("11 VMs → kvm-03 ×4, kvm-07 ×4, kvm-09 ×3; all fit")."""
    from vms import failover

    rows = failover.preview_evacuation(host)
    targets = [r["target"] for r in rows]
    return {"rows": rows, "fits": all(targets),
            "summary": failover.spread_summary(targets) if rows else "no running VMs"}
