"""The operator dashboard (issue 4): server-rendered pages, each kept live by
static/dashboard/live.js (the /ws/events socket) and a small page handler.

Reads need a login; actions need an admin (dashboard.perms), checked here.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from urllib.parse import urlencode

from django.contrib import messages
from django.contrib.admin.utils import quote as admin_quote
from django.contrib.auth.decorators import login_required
from django.db.models import Count, Max, Q
from django.http import Http404, HttpResponseNotAllowed, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from hadash import config, live
from hadash.choices import FINAL_STEPS, Step, Subject, WorkType
from hadash.ha import actions
from hadash.models import Configuration, Event, HaWork
from hadash.names import name_problem
from hosts.choices import HostStatus
from hosts.models import Host
from vms import discovery
from vms.choices import ACTIVE_STATES, Priority
from vms.models import VMInstance

from . import alerts, fleetproxy, lists, summary
from .perms import admin_required, is_admin, wants_json

# The client resumes from a little before the newest event the page shows, and drops
# the ids it already has: an event committed just after the render (an older id that
# was still in flight) is not lost.
LIVE_MARGIN = 50
FEED_ROWS = 100
EV = live.FIELDS


def production_engine():
    """The engine the VM start action places and starts VMs with (tests replace it)."""
    from hadash.ha.engine import Engine

    return Engine.production()


def latest_event_id() -> int:
    return Event.objects.aggregate(m=Max("id"))["m"] or 0


def page(request, template: str, name: str, ctx: dict, *, top_id: int | None = None):
    top = latest_event_id() if top_id is None else top_id
    ctx.update(
        page=name,
        is_admin=is_admin(request.user),
        fleet_url=fleetproxy.url(),
        live_after=max(0, top - LIVE_MARGIN),
        live_top=top,
    )
    return render(request, template, ctx)


def events_values(qs, n: int) -> list[dict]:
    return list(qs.order_by("-id").values(*EV)[:n])


# --- overview -----------------------------------------------------------------


@login_required
def overview(request):
    feed = events_values(Event.objects.all(), FEED_ROWS)
    ctx = summary.overview()
    ctx.update(alerts.panel())  # R19: open rows of the alert table (dashboard.alerts)
    ctx.update(feed=feed,
               unmanaged_count=discovery.listed(now=timezone.now()).count())  # issue 9
    return page(request, "dashboard/overview.html", "overview", ctx,
                top_id=feed[0]["id"] if feed else 0)


@login_required
def summary_json(request):
    return JsonResponse(summary.summary_json(request.GET.get("hosts", "")[:64]))


# --- hosts --------------------------------------------------------------------


HOST_HISTORY_EVENTS = ("HostDown", "PingTimeout", "AgentDisconnected", "AgentConnected",
                       "Ready", "Ping", "ShutdownRequested", "WaitedTooLong", "HostFenced",
                       "FenceFailed", "HaScheduled", "ResourceStateChanged",
                       "ReEnrolAllowed", "ReEnrolled")  # R29


@login_required
def host(request, name: str):
    h = get_object_or_404(Host, name=name)
    cfg = config.snapshot()
    now = timezone.now()
    vms = list(VMInstance.objects.filter(host=h).select_related("power_host").order_by("name"))
    active = [v for v in vms if v.state in ACTIVE_STATES]
    work = list(
        HaWork.objects.filter(Q(host=h) | Q(target_host=h))
        .select_related("instance", "host", "target_host").order_by("-id")[:100]
    )
    own = events_values(Event.objects.filter(subject=Subject.HOST, subject_id=h.pk), 100)
    investigations = [e for e in own if e["event"] in HOST_HISTORY_EVENTS or e["alert"]]
    power = events_values(Event.objects.filter(host=h, event="PowerStateChanged"), 30)
    feed = events_values(Event.objects.filter(host=h), FEED_ROWS)
    threshold = cfg["ping.interval"] * cfg["ping.timeout"]
    age = summary.age_seconds(h.last_ping, now)
    ctx = {
        "host": h,
        "vms": vms,
        "allocated_cpus": sum(v.cpus for v in active),
        "allocated_memory_mb": sum(v.memory_mb for v in active),
        "active_vms": len(active),
        "work": work,
        "open_work": sum(1 for w in work if w.step not in FINAL_STEPS),
        "investigations": investigations,
        "power": power,
        "feed": feed,
        "ping_interval": cfg["ping.interval"],
        "ping_threshold": threshold,
        "ping_age": age,
        "behind": age is not None and age > threshold
        and h.status in (HostStatus.UP, HostStatus.CONNECTING),
        "host_actions": host_actions(h),
        "reenrol_open": h.reenrol_open(now),  # R29
        "unmanaged": list(discovery.listed(now=now).filter(host=h)[:200]),  # issue 9
    }
    return page(request, "dashboard/host.html", "host", ctx)


def host_actions(h: Host) -> list[tuple[str, str]]:
    """The operator actions that make sense in the host's resource state."""
    rs = h.resource_state
    out = []
    if rs == "Disabled":
        out.append(("enable", "Enable"))
    if rs == "Enabled":
        out.append(("disable", "Disable"))
    if rs in ("Enabled", "Disabled", "ErrorInMaintenance") and not actions.maintenance_refusal(h):
        out.append(("maintenance", "Prepare for maintenance…"))
    if rs in ("PrepareForMaintenance", "Maintenance", "ErrorInMaintenance"):
        out.append(("cancel-maintenance", "Cancel maintenance"))
    return out


HOST_ACTIONS = {
    "enable": lambda h, now, by: actions.set_host_enabled(h, True, now=now, by=by),
    "disable": lambda h, now, by: actions.set_host_enabled(h, False, now=now, by=by),
    "maintenance": lambda h, now, by: actions.prepare_maintenance(h, now=now, by=by),
    "cancel-maintenance": lambda h, now, by: actions.cancel_maintenance(h, now=now, by=by),
}


def running_vm_count(h: Host) -> int:
    return VMInstance.objects.filter(host=h, state="Running").count()


def maintenance_confirm(request, h: Host, error: str = ""):
    """The confirmation step of one-click maintenance (issue 10 item 7): names the
    host and how many running VMs will be migrated; the POST needs confirm=yes."""
    running = running_vm_count(h)
    return page(request, "dashboard/host_maintenance.html", "host-maintenance", {
        "host": h, "running": running, "error": error,
        "refusal": actions.maintenance_refusal(h),
        "allowed": h.resource_state in ("Enabled", "Disabled", "ErrorInMaintenance"),
    }, top_id=latest_event_id())


def action_outcome(h: Host, action: str) -> str:
    """What an operator's host action did, in words (not "done — resource state
    PrepareForMaintenance")."""
    h.refresh_from_db()
    if action == "enable":
        return f"Host {h.name} enabled: new VMs may be placed on it."
    if action == "disable":
        return f"Host {h.name} disabled: no new VMs are placed on it; running VMs stay."
    if action == "cancel-maintenance":
        return f"Maintenance of {h.name} cancelled: the host is Enabled again."
    if h.resource_state == "Maintenance":
        return f"Host {h.name} is now in Maintenance (no running VM had to move)."
    migrating = HaWork.objects.unfinished().filter(host=h, type=WorkType.MIGRATION).count()
    return (f"Maintenance of {h.name} started: {migrating} VM{'s' if migrating != 1 else ''} "
            f"migrating; the host goes into Maintenance when none is left.")


@admin_required
def host_action(request, name: str, action: str):
    run = HOST_ACTIONS.get(action)
    if run is None:
        raise Http404(f"no host action {action!r}")
    h = get_object_or_404(Host, name=name)
    if action == "maintenance":
        if request.method == "GET":
            return maintenance_confirm(request, h)
        if request.method == "POST" and request.POST.get("confirm") != "yes":
            return maintenance_confirm(
                request, h, "Maintenance not confirmed; nothing changed.")
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    try:
        run(h, timezone.now(), request.user.get_username())
    except actions.ActionError as exc:
        messages.error(request, f"Refused: {exc}.")
    else:
        messages.success(request, action_outcome(h, action))
    return redirect("dash:host", name=name)


@require_POST
@admin_required
def host_reenrol(request, name: str):
    """R29: an admin re-enrols a host — one agent connect with the join key may take it
    within the hour. The form asks for an explicit confirmation."""
    h = get_object_or_404(Host, name=name)
    if request.POST.get("confirm") != "yes":
        messages.error(request, f"Host {h.name}: re-enrolment not confirmed; nothing changed.")
        return redirect("dash:host", name=name)
    until = h.allow_reenrol(now=timezone.now(), by=request.user.get_username())
    messages.warning(
        request,
        f"Host {h.name}: re-enrolment allowed until {until:%Y-%m-%d %H:%M:%S %Z} — the next "
        "agent connect with the join key under this name takes the host.")
    return redirect("dash:host", name=name)


# --- lists (issue 10 item 6) ---------------------------------------------------


@login_required
def hosts_page(request):
    """Every host: search, filters, problems first, 50 a page (dashboard.lists)."""
    return page(request, "dashboard/hosts.html", "hosts", lists.host_list(request))


@login_required
def vms_page(request):
    """Every VM: search, filters, problems first, 50 a page (dashboard.lists)."""
    return page(request, "dashboard/vms.html", "vms", lists.vm_list(request))


# --- VMs ----------------------------------------------------------------------


@login_required
def vm(request, name: str):
    v = get_object_or_404(
        VMInstance.objects.select_related("host", "last_host", "power_host"), name=name
    )
    history = events_values(Event.objects.filter(subject=Subject.VM, subject_id=v.pk), 200)
    # Every HA item it had — from the events, as finished items may have been purged.
    work_events = list(Event.objects.filter(subject=Subject.WORK, vm=v)
                       .order_by("-id").values(*EV)[:3000])[::-1]
    by_item: dict[int, list[dict]] = defaultdict(list)
    for e in work_events:
        by_item[e["subject_id"]].append(e)
    rows = {w.pk: w for w in HaWork.objects.filter(instance=v)
            .select_related("host", "target_host")}
    items = []
    for pk in sorted(set(by_item) | set(rows), reverse=True):
        evs = by_item.get(pk, [])
        w = rows.get(pk)
        first = evs[0] if evs else None
        items.append({
            "id": pk,
            "row": w,
            "events": evs,
            "type": w.type if w else (first["message"].split(" ", 1)[0] if first else "?"),
            "reason": w.reason if w else (first["reason"] if first else ""),
            "step": w.step if w else (evs[-1]["new"] if evs else "?"),
            "start": first["time"] if first else (w.created if w else None),
            "purged": w is None,
        })
    ctx = {
        "vm": v,
        "history": history,
        "items": items,
        "open_item": any(i["step"] not in FINAL_STEPS for i in items),
        "can_start": v.state == "Stopped",
        # R15a: a stop also cancels an unfinished HA restart of a Stopped VM.
        "can_stop": v.state not in ("Stopped", "Destroyed", "Expunging")
        or (v.state == "Stopped" and any(
            i["type"] == WorkType.HA and i["step"] not in FINAL_STEPS for i in items)),
    }
    return page(request, "dashboard/vm.html", "vm", ctx)


def stop_outcome(v, item) -> str:
    """What an operator stop did (R15a), in words: queued a stop, cancelled an HA restart,
    or nothing at all for a VM that is already Stopped."""
    if item is None:
        return f"VM {v.name} is already Stopped; nothing to do."
    if item.type == WorkType.HA:
        return f"VM {v.name}: HA restart cancelled (HA work #{item.pk}); the VM stays Stopped."
    return f"VM {v.name}: stop queued (HA work #{item.pk})."


@require_POST
@admin_required
def vm_action(request, name: str, action: str):
    v = get_object_or_404(VMInstance, name=name)
    by = request.user.get_username()
    try:
        if action == "stop":
            item = actions.stop_vm(v, now=timezone.now(), by=by)
            messages.success(request, stop_outcome(v, item))
        elif action == "start":
            v = actions.start_vm(v, engine=production_engine(), by=by)
            messages.success(request, f"VM {v.name} started on {v.host.name}.")
        else:
            raise Http404(f"no VM action {action!r}")
    except actions.ActionError as exc:
        messages.error(request, str(exc))
    return redirect("dash:vm", name=name)


# --- HA work queue ------------------------------------------------------------


WORK_LIMITS = (100, 200, 500, 1000)


@login_required
def work(request):
    step = request.GET.get("step", "")
    wtype = request.GET.get("type", "")
    show = request.GET.get("show", "all")
    try:
        limit = int(request.GET.get("limit", 200))
    except ValueError:
        limit = 200
    limit = min(max(limit, 1), WORK_LIMITS[-1])
    qs = HaWork.objects.select_related("instance", "host", "target_host").order_by("-id")
    if step in Step.values:
        qs = qs.filter(step=step)
    if wtype in WorkType.values:
        qs = qs.filter(type=wtype)
    if show == "open":
        qs = qs.unfinished()
    elif show == "finished":
        qs = qs.filter(step__in=FINAL_STEPS)
    step_counts = dict(HaWork.objects.order_by().values("step").annotate(n=Count("id"))
                       .values_list("step", "n"))
    type_counts = dict(HaWork.objects.order_by().values("type").annotate(n=Count("id"))
                       .values_list("type", "n"))
    rows = list(qs[:limit])
    now = timezone.now()

    def link(**change):
        q = {"step": step, "type": wtype, "show": show, **change}
        return "?" + urlencode({k: v for k, v in q.items() if v and v != "all"})

    ctx = {
        "rows": rows,
        "now": now,
        "step": step,
        "type": wtype,
        "show": show,
        "limit": limit,
        "steps": [(s, step_counts.get(s, 0), link(step="" if s == step else s))
                  for s in Step.values],
        "types": [(t, type_counts.get(t, 0), link(type="" if t == wtype else t))
                  for t in WorkType.values],
        "shows": [(s, link(show=s)) for s in ("all", "open", "finished")],
        "total": sum(step_counts.values()),
        "open_total": sum(n for s, n in step_counts.items() if s not in FINAL_STEPS),
        "lease": dt.timedelta(minutes=5),
    }
    return page(request, "dashboard/work.html", "work", ctx)


# --- configuration ------------------------------------------------------------


def config_text(k: config.Key, value) -> str:
    if k.type == "bool":
        return "true" if value else "false"
    if k.type == "list":
        return ",".join(value)
    if k.type == "float":
        return repr(float(value)) if value != int(value) else f"{int(value)}"
    return str(value)


@login_required
def config_page(request):
    snap = config.snapshot().as_dict()
    stored = {r.name: r for r in Configuration.objects.all()}
    rows = []
    for name in sorted(config.KEYS, key=lambda n: (config.KEYS[n].category, n)):
        k = config.KEYS[name]
        row = stored.get(name)
        value = config_text(k, snap[name])
        rows.append({
            "key": k,
            "value": value,
            "is_default": value == k.normalise(k.default),
            "stored": row.value if row else None,
            "invalid": row is not None and row.value != value,
            "updated": row.updated if row else None,
            "admin_url": reverse("admin:hadash_configuration_change",
                                 args=[admin_quote(name)]) if row else
            reverse("admin:hadash_configuration_changelist"),
        })
    return page(request, "dashboard/config.html", "config", {
        "rows": rows, "can_edit": request.user.is_staff,
    })


# --- unmanaged VMs (issue 9 part 2) ---------------------------------------------

UNMANAGED_SHOWN = 2000


@login_required
def unmanaged_page(request):
    """VMs hosts report that hadash does not manage; admins adopt them (checkboxes,
    HA on/off, priority, an explicit confirmation). Nothing is adopted automatically."""
    rows = list(discovery.listed(now=timezone.now())[:UNMANAGED_SHOWN + 1])
    return page(request, "dashboard/unmanaged.html", "unmanaged", {
        "rows": rows[:UNMANAGED_SHOWN], "more": len(rows) > UNMANAGED_SHOWN,
        "priorities": Priority.values, "expire_minutes": int(discovery.EXPIRE.seconds // 60),
    })


def _positive(value: str, field: str) -> int | None:
    value = (value or "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1 or int(value) > 2**31 - 1:
        raise ValueError(f"{field} must be a whole number of at least 1")
    return int(value)


@require_POST
@admin_required
def unmanaged_adopt(request):
    """Adopt the checked VMs (each a "host/name" value) in one transaction
    (hadash.ha.actions.adopt_vms): all or none."""
    picked = request.POST.getlist("vm")
    if not picked:
        messages.error(request, "No VM selected; nothing adopted.")
        return redirect("dash:unmanaged")
    if request.POST.get("confirm") != "yes":
        messages.error(request, "Adoption not confirmed; nothing adopted.")
        return redirect("dash:unmanaged")
    priority = request.POST.get("priority", Priority.MEDIUM)
    if priority not in Priority.values:
        messages.error(request, f"priority must be one of {', '.join(Priority.values)}")
        return redirect("dash:unmanaged")
    try:
        cpus = _positive(request.POST.get("cpus", ""), "cpus")
        memory_mb = _positive(request.POST.get("memory_mb", ""), "memory_mb")
    except ValueError as exc:
        messages.error(request, str(exc))
        return redirect("dash:unmanaged")
    entries = []
    for value in picked:
        host_name, _, name = value.partition("/")
        if name_problem(host_name) or name_problem(name):
            messages.error(request, "A selected VM or host name is not valid; nothing adopted.")
            return redirect("dash:unmanaged")
        entry = {"name": name, "host": host_name, "priority": priority,
                 "ha_enabled": request.POST.get("ha_enabled") == "on"}
        if cpus:
            entry["cpus"] = cpus
        if memory_mb:
            entry["memory_mb"] = memory_mb
        entries.append(entry)
    try:
        adopted = actions.adopt_vms(entries, now=timezone.now(),
                                    by=request.user.get_username())
    except actions.ActionError as exc:
        messages.error(request, f"Nothing adopted: {exc}")
        return redirect("dash:unmanaged")
    names = ", ".join(v.name for v in adopted[:10]) + (" …" if len(adopted) > 10 else "")
    messages.success(request, f"Adopted {len(adopted)} VM(s): {names}")
    return redirect("dash:unmanaged")


# --- simulator panel ----------------------------------------------------------


def _fleet_attached():
    if not fleetproxy.url():
        raise Http404("no simulated fleet is attached (HADASH_FLEET_URL is not set)")


def _with_db_state(sim_hosts: list[dict]) -> list[dict]:
    names = [h.get("name") for h in sim_hosts if isinstance(h, dict)]
    db = {r["name"]: r for r in Host.objects.filter(name__in=names)
          .values("name", "status", "resource_state", "agent_name", "agent_version")}
    for h in sim_hosts:
        row = db.get(h.get("name"), {})
        h["db_status"] = row.get("status", "")
        h["db_resource_state"] = row.get("resource_state", "")
        h["db_agent"] = " ".join(filter(None, (row.get("agent_name"), row.get("agent_version"))))
        h["vm_count"] = len(h.get("vms") or [])
    return sim_hosts


@login_required
def fleet_page(request):
    _fleet_attached()
    error = ""
    sim_hosts: list[dict] = []
    try:
        sim_hosts = _with_db_state(fleetproxy.hosts())
    except fleetproxy.FleetError as exc:
        error = str(exc)
    return page(request, "dashboard/fleet.html", "fleet", {
        "sim_hosts": sim_hosts, "error": error,
    })


@login_required
def fleet_hosts_json(request):
    _fleet_attached()
    try:
        sim_hosts = _with_db_state(fleetproxy.hosts())
    except fleetproxy.FleetError as exc:
        return JsonResponse({"error": str(exc)}, status=exc.status)
    # R17: hadash's HA status of each simulated host (suspect before it is declared).
    from hosts import hastatus

    rows = list(Host.objects.filter(name__in=[h.get("name") for h in sim_hosts
                                              if isinstance(h, dict)]))
    statuses = hastatus.statuses_for(rows, now=timezone.now())
    by_name = {r.name: statuses[r.pk].as_dict() for r in rows}
    for h in sim_hosts:
        if isinstance(h, dict):
            h["ha_status"] = by_name.get(h.get("name"))
    return JsonResponse({"hosts": sim_hosts})


@admin_required
def fleet_fault(request):
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    _fleet_attached()
    do = request.POST.get("do", "")
    try:
        result = fleetproxy.fault(do)
    except fleetproxy.FleetError as exc:
        if wants_json(request):
            return JsonResponse({"error": str(exc)}, status=exc.status)
        messages.error(request, str(exc))
        return redirect("dash:fleet")
    if wants_json(request):
        return JsonResponse(result)
    messages.success(request, f"Fault applied: {result.get('do', do)}")
    return redirect("dash:fleet")
