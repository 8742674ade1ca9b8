"""Cluster pages (SPEC R22): each cluster's failover plan — its capacity against
ha.failover.level, where each HA VM of each host would restart if that host failed,
which would not fit — and "what if hosts X, Y fail now?" (a plain GET form: computed
on a copy of the state, nothing changes)."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.db.models import Count, Q
from django.http import Http404
from django.utils import timezone

from clusters import plans
from clusters.models import FailoverPlan
from hadash import config
from hosts.choices import HostStatus
from hosts.models import Host
from vms import failover

from .views import page

PLAN_ROWS = 2000  # hosts listed on one cluster page


@login_required
def clusters_page(request):
    stored = {p.cluster: p for p in FailoverPlan.objects.defer("plan", "summaries", "worst")}
    rows = []
    for r in Host.objects.values("cluster").annotate(
            hosts=Count("id"), up=Count("id", filter=Q(status=HostStatus.UP))).order_by("cluster"):
        rows.append({**r, "plan": stored.get(r["cluster"])})
    return page(request, "dashboard/clusters.html", "clusters", {"rows": rows})


def _groups_of(cluster: str) -> list[dict]:
    """R25: the VM groups of the cluster (named for it, or with a member there), each
    with its members and where they run."""
    from django.db.models import Prefetch

    from vms import groups as vm_groups
    from vms.models import VmGroup, VMInstance

    members = VMInstance.objects.select_related("host").order_by("name")
    found = (VmGroup.objects.filter(Q(cluster=cluster) | Q(members__host__cluster=cluster)
                                    | Q(members__last_host__cluster=cluster))
             .distinct().order_by("name")
             .prefetch_related(Prefetch("members", queryset=members))[:200])
    return [{"group": g, "members": list(g.members.all()),
             "conflicts": vm_groups.conflicts(g)} for g in found]


@login_required
def cluster_page(request, name: str):
    hosts = list(Host.objects.filter(cluster=name).order_by("name")[:PLAN_ROWS])
    if not hosts:
        raise Http404(f"unknown cluster {name}")
    plan = plans.current(name, now=timezone.now())
    unfit = set(plan.unfit) if plan else set()
    rows = []
    for h in hosts:
        placements = (plan.plan.get(h.name) if plan else None) or {}
        rows.append({
            "host": h,
            "summary": (plan.summaries.get(h.name) if plan else "") or "",
            "placements": sorted(placements.items()),
            "fits": all(t for t in placements.values()),
        })
    picked = [n for n in request.GET.getlist("fail") if n]
    what_if, what_if_error = None, ""
    if picked:
        state = failover.load([name], cfg=config.snapshot()).get(name)
        try:
            what_if = failover.what_if(state, picked)
        except ValueError as exc:
            what_if_error = str(exc)
    return page(request, "dashboard/cluster.html", "clusters", {
        "groups": _groups_of(name),
        "admission": config.snapshot()["ha.admission"],
        "cluster": name, "plan": plan, "rows": rows, "unfit_count": len(unfit),
        "ha_hosts": sum(1 for r in rows if r["placements"]),  # hosts running HA VMs now
        "picked": picked, "what_if": what_if,
        "what_if_rows": sorted(what_if.placements.items()) if what_if else [],
        "what_if_error": what_if_error,
        "truncated": len(hosts) >= PLAN_ROWS,
    })
