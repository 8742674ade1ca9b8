"""Host and VM list pages (issue 10 item 6): search, filters, problem rows first,
paging — a fixed number of queries per page whatever the fleet's size (1,000 hosts,
10,000 VMs).

Each list is a queryset filtered by the request's parameters and ordered in the
database by a *problem rank* (hosts: Down, Alert, behind on ping, ErrorInMaintenance …
before Up; VMs: Error, HA work in progress, power disagreeing with state … before
Running), then by name. Only the page's rows are read, and the page's extra facts (VMs
per host, open HA items) cost one aggregate query each.

The HA status column (R17) comes from vms.hastatus / hosts.hastatus (statuses_for, a
fixed number of queries for the page); the HA status filter offers exactly the codes
that column shows, each selected in the database by the same modules' filter_code (the
rule next to the function that computes it), so paging and totals stay a fixed number
of queries. The VM list also filters on the VM's own HA setting (ha_enabled).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from urllib.parse import urlencode

from django.core.paginator import EmptyPage, PageNotAnInteger, Paginator
from django.db.models import Case, Count, IntegerField, Q, Sum, Value, When
from django.utils import timezone

from hadash import config
from hadash.choices import FINAL_STEPS, WorkType
from hadash.models import HaWork
from hosts import hastatus as host_hastatus
from hosts.choices import HostStatus, ResourceState
from hosts.hastatus import statuses_for as host_statuses_for
from hosts.models import Host
from vms import hastatus as vm_hastatus
from vms.choices import ACTIVE_STATES, PowerState, VmState
from vms.hastatus import statuses_for as vm_statuses_for
from vms.models import VMInstance

PAGE_SIZE = 50
SEARCH_MAX = 255  # a name is at most this long: longer searches match nothing anyway
PAGE_WINDOW = 3  # page links shown either side of the current page


@dataclasses.dataclass
class Choice:
    value: str
    label: str
    count: int | None = None
    href: str = ""
    on: bool = False


@dataclasses.dataclass
class PageLink:
    number: int | None  # None: a gap ("…")
    href: str = ""
    current: bool = False


def _clean(request, name: str, allowed=None) -> str:
    """One query parameter, stripped; a value outside ``allowed`` is ignored (no
    filter) rather than an error page: these are links and forms an operator edits."""
    v = (request.GET.get(name) or "").strip()[:SEARCH_MAX]
    if allowed is not None and v not in allowed:
        return ""
    return v


class ListQuery:
    """The parameters of a list page and links that change one of them."""

    def __init__(self, request, params: dict[str, str]):
        self.request = request
        self.params = {k: v for k, v in params.items() if v}

    def link(self, **change) -> str:
        q = dict(self.params)
        q.pop("page", None)
        for k, v in change.items():
            if v in ("", None):
                q.pop(k, None)
            else:
                q[k] = str(v)
        return "?" + urlencode(sorted(q.items())) if q else "?"

    def toggle(self, name: str, value: str) -> str:
        return self.link(**{name: "" if self.params.get(name) == value else value})

    def page_link(self, n: int) -> str:
        q = dict(self.params)
        q["page"] = str(n)
        if n == 1:
            q.pop("page")
        return "?" + urlencode(sorted(q.items())) if q else "?"


def paginate(qs, request, query: ListQuery, *, total: int | None = None) -> dict:
    """The page asked for (the last one when past the end), its page links and the
    total count (one COUNT query, none when ``total`` is known already)."""
    paginator = Paginator(qs, PAGE_SIZE)
    if total is not None:
        paginator.__dict__["count"] = total  # Paginator.count is a cached_property
    raw = request.GET.get("page") or "1"
    try:
        page = paginator.page(raw)
    except PageNotAnInteger:
        page = paginator.page(1)
    except EmptyPage:
        page = paginator.page(paginator.num_pages)
    n, last = page.number, paginator.num_pages
    numbers = sorted({1, last, *range(max(1, n - PAGE_WINDOW), min(last, n + PAGE_WINDOW) + 1)})
    links: list[PageLink] = []
    prev = 0
    for k in numbers:
        if prev and k > prev + 1:
            links.append(PageLink(None))
        links.append(PageLink(k, query.page_link(k), k == n))
        prev = k
    return {
        "page_obj": page,
        "rows": list(page.object_list),
        "total": paginator.count,
        "page_links": links,
        "prev_href": query.page_link(n - 1) if page.has_previous() else "",
        "next_href": query.page_link(n + 1) if page.has_next() else "",
        "first_index": page.start_index(),
        "last_index": page.end_index(),
    }


# --- hosts --------------------------------------------------------------------------

HOST_SORTS = {"problem": "problems first", "name": "name", "cluster": "cluster"}
# The HA status filter: exactly the R17 codes of the column (hosts.hastatus.CODES).
HOST_HA_WORDS = {
    "down": "declared failed",
    "alert": "unreachable, maybe alive",
    "investigating": "behind on ping, being investigated",
    "suspect": "behind on ping, verdict due",
    "connecting": "agent connecting",
    "disconnected": "agent disconnected",
    "removed": "removed",
    "error": "status Error",
    "rebalancing": "rebalancing",
    "error-in-maintenance": "a maintenance migration failed",
    "prepare-for-maintenance": "VMs moving away",
    "maintenance": "in maintenance",
    "disabled": "disabled by an operator",
    "up": "Up and on time",
}
HOST_HA = {c: f"{c} — {HOST_HA_WORDS[c]}" for c in host_hastatus.CODES}


def behind_cutoff(now, cfg) -> dt.datetime:
    """A host whose last ping is older than this is behind on ping (SPEC §2)."""
    return now - dt.timedelta(seconds=cfg["ping.interval"] * cfg["ping.timeout"])


def host_rank(now, cfg):
    """Problem rank: the lower, the sooner an operator should look."""
    behind = (Q(status__in=(HostStatus.UP, HostStatus.CONNECTING))
              & (Q(last_ping__lt=behind_cutoff(now, cfg)) | Q(last_ping__isnull=True)))
    return Case(
        When(status=HostStatus.DOWN, then=Value(0)),
        When(status=HostStatus.ALERT, then=Value(1)),
        When(status=HostStatus.ERROR, then=Value(2)),
        When(behind, then=Value(3)),
        When(resource_state=ResourceState.ERROR_IN_MAINTENANCE, then=Value(4)),
        When(status=HostStatus.DISCONNECTED, then=Value(5)),
        When(~Q(status=HostStatus.UP), then=Value(6)),
        When(resource_state=ResourceState.PREPARE_FOR_MAINTENANCE, then=Value(7)),
        When(~Q(resource_state=ResourceState.ENABLED), then=Value(8)),
        default=Value(9),
        output_field=IntegerField(),
    )


def tag_filter(tag: str) -> Q:
    """Hosts carrying ``tag`` in their comma-separated tags (spaces around commas
    allowed)."""
    return Q(tags__iregex=r"(^|,)\s*" + re.escape(tag) + r"\s*(,|$)")


def host_list(request, now=None) -> dict:
    now = now or timezone.now()
    cfg = config.snapshot()
    p = {
        "q": _clean(request, "q"),
        "status": _clean(request, "status", HostStatus.values),
        "rs": _clean(request, "rs", ResourceState.values),
        "cluster": _clean(request, "cluster"),
        "tag": _clean(request, "tag"),
        "ha": _clean(request, "ha", HOST_HA),
        "sort": _clean(request, "sort", HOST_SORTS),
        "page": _clean(request, "page"),
    }
    query = ListQuery(request, p)
    qs = Host.objects.all()
    if p["q"]:
        qs = qs.filter(name__icontains=p["q"])
    if p["cluster"]:
        qs = qs.filter(cluster=p["cluster"])
    if p["tag"]:
        qs = qs.filter(tag_filter(p["tag"]))
    if p["rs"]:
        qs = qs.filter(resource_state=p["rs"])
    if p["ha"]:
        qs = host_hastatus.filter_code(qs, p["ha"], now=now, cfg=cfg)
    # Status counts are of the list as filtered by everything but the status itself.
    status_counts = dict(qs.order_by().values("status").annotate(n=Count("id"))
                         .values_list("status", "n"))
    if p["status"]:
        qs = qs.filter(status=p["status"])
    qs = qs.annotate(rank=host_rank(now, cfg))
    sort = p["sort"] or "problem"
    qs = qs.order_by(*{"problem": ("rank", "name"), "name": ("name",),
                       "cluster": ("cluster", "rank", "name")}[sort])
    total = (status_counts.get(p["status"], 0) if p["status"]
             else sum(status_counts.values()))
    out = paginate(qs, request, query, total=total)
    hosts = out["rows"]
    usage = {
        r["host_id"]: r for r in VMInstance.objects.filter(
            host_id__in=[h.pk for h in hosts], state__in=ACTIVE_STATES)
        .order_by().values("host_id")
        .annotate(n=Count("id"), cpus=Sum("cpus"), mem=Sum("memory_mb"))
    }
    cutoff = behind_cutoff(now, cfg)
    for h in hosts:
        u = usage.get(h.pk, {})
        h.vm_count = u.get("n", 0)
        h.allocated_cpus = u.get("cpus") or 0
        h.allocated_memory_mb = u.get("mem") or 0
        h.behind = (h.status in (HostStatus.UP, HostStatus.CONNECTING)
                    and (h.last_ping is None or h.last_ping < cutoff))
    ha_statuses(hosts, "host", now, cfg)
    clusters = list(Host.objects.order_by("cluster").values_list("cluster", flat=True)
                    .distinct())
    tags = sorted({t.strip() for row in Host.objects.exclude(tags="").order_by()
                   .values_list("tags", flat=True).distinct() for t in row.split(",")
                   if t.strip()}, key=str.lower)
    statuses = [s for s in HostStatus.values if status_counts.get(s) or s == p["status"]]
    out.update(
        query=query,
        p=p,
        sort=sort,
        statuses=[Choice(s, s, status_counts.get(s, 0), query.toggle("status", s),
                         s == p["status"]) for s in statuses],
        resource_states=ResourceState.values,
        clusters=clusters,
        tags=tags,
        ha_choices=list(HOST_HA.items()),
        sorts=[Choice(k, v, None, query.link(sort="" if k == "problem" else k), k == sort)
               for k, v in HOST_SORTS.items()],
        filtered=any(p[k] for k in ("q", "status", "rs", "cluster", "tag", "ha")),
        ping_threshold=cfg["ping.interval"] * cfg["ping.timeout"],
        now=now,
    )
    return out


# --- VMs ------------------------------------------------------------------------------

VM_SORTS = {"problem": "problems first", "name": "name", "host": "host"}
# The HA status filter: exactly the R17 codes of the column (vms.hastatus.CODES), then
# the VM's own HA setting (force.ha and vm.ha.enabled aside).
VM_HA_WORDS = {
    "failed": "HA gave up, or the VM is in Error",
    "waiting": "HA work waiting, or its host in Alert",
    "recovering": "HA work in progress",
    "at-risk": "would not fit, or its host cannot be fenced",
    "unprotected": "not HA-enabled",
    "stopped": "Stopped, not by a failure HA handles",
    "protected": "HA-enabled, fits, host fenceable",
}
VM_HA = {c: f"{c} — {VM_HA_WORDS[c]}" for c in vm_hastatus.CODES}
VM_HA_SETTING = {"on": "setting: ha_enabled on", "off": "setting: ha_enabled off"}


def open_ha_vm_ids():
    """Ids of the VMs with an unfinished HA item (few: the partial index of unfinished
    items), as a subquery PostgreSQL hashes once — not an EXISTS per VM, whose estimated
    cost over 100,000 VMs made PostgreSQL JIT-compile the list query for seconds."""
    return (HaWork.objects.filter(type=WorkType.HA).exclude(step__in=FINAL_STEPS)
            .values("instance_id"))


def host_unreachable():
    """HA VMs whose host is in Alert, before any HA item: R17 ``waiting:
    host-unreachable`` (vms.hastatus, force.ha aside). The hosts in Alert are a
    subquery (no join of every VM to its host)."""
    return Q(ha_enabled=True,
             host_id__in=Host.objects.filter(status=HostStatus.ALERT).values("id"),
             state__in=(VmState.RUNNING, VmState.STARTING, VmState.STOPPING,
                        VmState.MIGRATING))


def vm_rank():
    """Problem rank for VMs: the lower, the sooner an operator should look."""
    return Case(
        When(state=VmState.ERROR, then=Value(0)),
        When(pk__in=open_ha_vm_ids(), then=Value(1)),
        When(host_unreachable(), then=Value(1)),
        When(Q(state=VmState.RUNNING) & ~Q(power_state=PowerState.POWER_ON), then=Value(2)),
        When(state__in=(VmState.STARTING, VmState.STOPPING, VmState.MIGRATING),
             then=Value(3)),
        When(state=VmState.RUNNING, then=Value(4)),
        When(state=VmState.STOPPED, then=Value(5)),
        default=Value(6),
        output_field=IntegerField(),
    )


def vm_list(request, now=None) -> dict:
    now = now or timezone.now()
    cfg = config.snapshot()
    p = {
        "q": _clean(request, "q"),
        "state": _clean(request, "state", VmState.values),
        "power": _clean(request, "power", PowerState.values),
        "cluster": _clean(request, "cluster"),
        "host": _clean(request, "host"),
        "tag": _clean(request, "tag"),
        "ha": _clean(request, "ha", {**VM_HA, **VM_HA_SETTING}),
        "sort": _clean(request, "sort", VM_SORTS),
        "page": _clean(request, "page"),
    }
    query = ListQuery(request, p)
    qs = VMInstance.objects.all()
    if p["q"]:
        qs = qs.filter(name__icontains=p["q"])
    if p["cluster"]:
        qs = qs.filter(Q(host__cluster=p["cluster"])
                       | Q(host__isnull=True, last_host__cluster=p["cluster"]))
    if p["host"]:
        qs = qs.filter(host__name=p["host"])
    if p["tag"]:
        qs = qs.filter(host__in=Host.objects.filter(tag_filter(p["tag"])))
    if p["power"]:
        qs = qs.filter(power_state=p["power"])
    if p["ha"] == "on":
        qs = qs.filter(ha_enabled=True)
    elif p["ha"] == "off":
        qs = qs.filter(ha_enabled=False)
    elif p["ha"]:
        qs = vm_hastatus.filter_code(qs, p["ha"], now=now, cfg=cfg)
    state_counts = dict(qs.order_by().values("state").annotate(n=Count("id"))
                        .values_list("state", "n"))
    if p["state"]:
        qs = qs.filter(state=p["state"])
    total = state_counts.get(p["state"], 0) if p["state"] else sum(state_counts.values())
    sort = p["sort"] or "problem"
    # The page is chosen on (id, rank) alone — one scan and a top-N sort, no join of
    # every VM to its hosts — and only its 50 rows are read whole (issue 12: 100,000
    # VMs).
    ids = (qs.annotate(rank=vm_rank())
           .order_by(*{"problem": ("rank", "name"), "name": ("name",),
                       "host": ("host__name", "rank", "name")}[sort])
           .values_list("pk", "rank"))
    out = paginate(ids, request, query, total=total)
    rank = dict(out["rows"])
    found = VMInstance.objects.select_related("host", "last_host").in_bulk(list(rank))
    vms = [found[pk] for pk in rank if pk in found]
    for v in vms:
        v.rank = rank[v.pk]
    out["rows"] = vms
    items = {}
    for w in (HaWork.objects.filter(instance_id__in=[v.pk for v in vms])
              .exclude(step__in=FINAL_STEPS).order_by("id")
              .only("id", "instance_id", "type", "step", "waiting", "time_to_try", "reason")):
        items[w.instance_id] = w  # the newest open item of each VM
    for v in vms:
        v.open_item = items.get(v.pk)
    ha_statuses(vms, "vm", now, cfg)
    clusters = list(Host.objects.order_by("cluster").values_list("cluster", flat=True)
                    .distinct())
    states = [s for s in VmState.values if state_counts.get(s) or s == p["state"]]
    out.update(
        query=query,
        p=p,
        sort=sort,
        states=[Choice(s, s, state_counts.get(s, 0), query.toggle("state", s),
                       s == p["state"]) for s in states],
        power_states=PowerState.values,
        clusters=clusters,
        ha_choices=list(VM_HA.items()),
        ha_setting_choices=list(VM_HA_SETTING.items()),
        sorts=[Choice(k, v, None, query.link(sort="" if k == "problem" else k), k == sort)
               for k, v in VM_SORTS.items()],
        filtered=any(p[k] for k in ("q", "state", "power", "cluster", "host", "tag", "ha")),
        now=now,
    )
    return out


def ha_statuses(rows: list, kind: str, now, cfg) -> None:
    """Set ``row.ha_status`` (R17) on a page of rows with helper H4's bulk functions
    (vms.hastatus / hosts.hastatus ``statuses_for``: a fixed number of queries)."""
    fn = vm_statuses_for if kind == "vm" else host_statuses_for
    result = fn(rows, now=now, cfg=cfg) if rows else {}
    for r in rows:
        r.ha_status = result.get(r.pk)
