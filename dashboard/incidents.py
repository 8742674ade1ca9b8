"""Incidents, rebuilt from events (HA items may have been purged, R16; events stay).

- A *host failure* is a ``HostDown`` event. Its timeline: what the host went through
  since it was last Up (Alert, WaitedTooLong, fencing…: the detection), the HostDown
  itself (the investigation's verdict, by which investigator), fencing, the VMs
  scheduled (``HaScheduled`` and one ``WorkScheduled`` per VM) and each VM's outcome
  (``HaStarted`` on which host, or not HA-enabled, Error, Cancelled, still running).
- A *VM failure* is an HA item scheduled with reason VmPowerOff or VmReportMissing:
  the power report that triggered it, the item's steps and the restart.

Time to recovery = the last ``HaStarted`` − the detection. A fixed number of queries
whatever the number of incidents (no per-incident query).
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field

from django.db.models import Count, Max
from django.db.models.functions import TruncMinute
from django.utils import timezone

from hadash.choices import FINAL_STEPS, Reason, Step, Subject
from hadash.models import Event
from hosts.choices import HostEvent, HostStatus

VALUES = ("id", "time", "subject", "subject_id", "subject_name", "event", "field", "old",
          "new", "reason", "message", "alert", "host_id", "vm_id")
LOOKBACK = dt.timedelta(days=1)
ROW_CAP = 20_000
VM_REASONS = (Reason.VM_POWER_OFF, Reason.VM_REPORT_MISSING)
# Host events that belong to a failure's story (not, say, a settings change).
STORY = {HostEvent.PING_TIMEOUT, HostEvent.AGENT_DISCONNECTED, HostEvent.WAIT_TIMEOUT,
         HostEvent.SHUTDOWN_REQUESTED, HostEvent.FENCED, HostEvent.FENCE_FAILED,
         HostEvent.HOST_DOWN, "HaScheduled"}


def in_story(ev: dict) -> bool:
    return ev["event"] in STORY or ev["field"] == "status"


@dataclass
class Item:
    """One VM of an incident: its HA item and what became of it."""

    id: int
    vm: str
    vm_id: int | None
    scheduled: dt.datetime
    scheduled_event: int
    step: str = ""
    finished: dt.datetime | None = None
    started: dict | None = None  # the HaStarted event
    events: list[dict] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        if self.started:
            return "restarted"
        if self.step == Step.DONE:
            return "done"
        if self.step in (Step.ERROR, Step.CANCELLED):
            return self.step.lower()
        return "in-progress"


@dataclass
class Incident:
    kind: str  # "host" or "vm"
    name: str  # host or VM name
    key: str  # stable id for the page: "host-<event id>" / "vm-<work id>"
    detected: dt.datetime
    trigger: dict  # HostDown event, or WorkScheduled event
    timeline: list[dict] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)

    @property
    def restarts(self) -> list[Item]:
        return [i for i in self.items if i.started]

    @property
    def open(self) -> bool:
        return any(i.step not in FINAL_STEPS for i in self.items)

    @property
    def recovered_at(self) -> dt.datetime | None:
        times = [i.started["time"] for i in self.items if i.started]
        return max(times) if times else None

    @property
    def recovery_seconds(self) -> float | None:
        """Last HaStarted − detection; None while nothing was restarted."""
        at = self.recovered_at
        return (at - self.detected).total_seconds() if at else None

    @property
    def status(self) -> str:
        if self.open:
            return "recovering"
        if any(i.step == Step.ERROR for i in self.items):
            return "failed"
        if self.restarts:
            return "recovered"
        return "closed"

    @property
    def reason(self) -> str:
        return self.trigger.get("reason", "")


def _values(qs) -> list[dict]:
    return list(qs.values(*VALUES)[:ROW_CAP])


def _attach_items(items: dict[int, Item]) -> None:
    """Each item's own events (subject work) and its HaStarted, in two queries."""
    if not items:
        return
    for ev in _values(Event.objects.filter(subject=Subject.WORK, subject_id__in=list(items))
                      .order_by("id")):
        it = items[ev["subject_id"]]
        it.events.append(ev)
        if ev["field"] == "step" and ev["new"]:
            it.step = ev["new"]
            if ev["new"] in FINAL_STEPS:
                it.finished = ev["time"]
    by_vm: dict[int, list[Item]] = defaultdict(list)
    for it in items.values():
        if it.vm_id is not None:
            by_vm[it.vm_id].append(it)
    if not by_vm:
        return
    first = min(it.scheduled_event for it in items.values())
    started = _values(Event.objects.filter(event="HaStarted", vm_id__in=list(by_vm),
                                           id__gt=first).order_by("id"))
    for ev in started:
        for it in sorted(by_vm[ev["vm_id"]], key=lambda i: i.scheduled_event):
            done = next((e["id"] for e in it.events if e["new"] in FINAL_STEPS), None)
            if it.started is None and ev["id"] > it.scheduled_event and (
                done is None or ev["id"] < done
            ):
                it.started = ev
                break


def host_incidents(limit: int) -> list[Incident]:
    downs = _values(Event.objects.filter(subject=Subject.HOST, event=HostEvent.HOST_DOWN)
                    .order_by("-id")[:limit])
    if not downs:
        return []
    host_ids = {d["subject_id"] for d in downs}
    since = min(d["time"] for d in downs) - LOOKBACK
    first_id = min(d["id"] for d in downs)
    host_events: dict[int, list[dict]] = defaultdict(list)
    for ev in _values(Event.objects.filter(subject=Subject.HOST, subject_id__in=host_ids,
                                           time__gte=since).order_by("id")):
        host_events[ev["subject_id"]].append(ev)
    scheduled = _values(Event.objects.filter(
        subject=Subject.WORK, event="WorkScheduled", reason=Reason.HOST_DOWN,
        host_id__in=host_ids, id__gt=first_id,
    ).order_by("id"))

    incidents: list[Incident] = []
    by_host: dict[int, list[Incident]] = defaultdict(list)
    for d in sorted(downs, key=lambda e: e["id"]):
        evs = host_events[d["subject_id"]]
        before = [e for e in evs if e["id"] < d["id"]]
        # Detection: what the host went through since it was last Up.
        since_up: list[dict] = []
        for e in reversed(before):
            if e["field"] == "status" and e["new"] == HostStatus.UP:
                break
            if in_story(e):
                since_up.insert(0, e)
        inc = Incident(kind="host", name=d["subject_name"], key=f"host-{d['id']}",
                       detected=(since_up[0]["time"] if since_up else d["time"]), trigger=d)
        inc.timeline = [*since_up, d]
        incidents.append(inc)
        by_host[d["subject_id"]].append(inc)
    # What followed each HostDown, up to the host's next HostDown or its return to Up.
    for hid, incs in by_host.items():
        for n, inc in enumerate(incs):
            nxt = incs[n + 1].trigger["id"] if n + 1 < len(incs) else None
            for e in host_events[hid]:
                if e["id"] <= inc.trigger["id"] or (nxt and e["id"] >= nxt) \
                        or not in_story(e):
                    continue
                inc.timeline.append(e)
                if e["field"] == "status" and e["new"] == HostStatus.UP:
                    break
    items: dict[int, Item] = {}
    for s in scheduled:
        owners = [i for i in by_host.get(s["host_id"], []) if i.trigger["id"] < s["id"]]
        if not owners:
            continue
        inc = owners[-1]
        it = Item(id=s["subject_id"], vm=s["subject_name"], vm_id=s["vm_id"],
                  scheduled=s["time"], scheduled_event=s["id"])
        inc.items.append(it)
        items[it.id] = it
    _attach_items(items)
    return incidents


def vm_incidents(limit: int) -> list[Incident]:
    scheduled = _values(Event.objects.filter(
        subject=Subject.WORK, event="WorkScheduled", reason__in=VM_REASONS,
    ).order_by("-id")[:limit])
    if not scheduled:
        return []
    vm_ids = {s["vm_id"] for s in scheduled if s["vm_id"] is not None}
    since = min(s["time"] for s in scheduled) - dt.timedelta(minutes=5)
    power: dict[int, list[dict]] = defaultdict(list)
    for ev in _values(Event.objects.filter(subject=Subject.VM, event="PowerStateChanged",
                                           vm_id__in=vm_ids, time__gte=since,
                                           id__lt=max(s["id"] for s in scheduled))
                      .order_by("id")):
        power[ev["vm_id"]].append(ev)
    incidents: list[Incident] = []
    items: dict[int, Item] = {}
    for s in scheduled:
        trig = [p for p in power.get(s["vm_id"], []) if p["id"] < s["id"]]
        cause = trig[-1] if trig and s["time"] - trig[-1]["time"] < dt.timedelta(minutes=5) \
            else None
        it = Item(id=s["subject_id"], vm=s["subject_name"], vm_id=s["vm_id"],
                  scheduled=s["time"], scheduled_event=s["id"])
        inc = Incident(kind="vm", name=s["subject_name"], key=f"vm-{s['subject_id']}",
                       detected=cause["time"] if cause else s["time"], trigger=s,
                       timeline=[cause] if cause else [], items=[it])
        incidents.append(inc)
        items[it.id] = it
    _attach_items(items)
    return incidents


def incidents(limit: int = 50) -> list[Incident]:
    """The latest ``limit`` incidents of both kinds, newest first."""
    both = host_incidents(limit) + vm_incidents(limit)
    both.sort(key=lambda i: (i.detected, i.trigger["id"]), reverse=True)
    return both[:limit]


def events_per_minute(minutes: int = 60, now=None) -> tuple[dt.datetime, list[tuple]]:
    """(window end, [(minute, count)…]) for the last ``minutes`` minutes of activity:
    the window ends now, or — when nothing happened for the whole window — at the
    latest event (so an idle system still shows its last busy hour)."""
    now = now or timezone.now()
    end = now
    start = end - dt.timedelta(minutes=minutes)
    latest = Event.objects.aggregate(m=Max("time"))["m"]
    if latest is not None and (latest < start or latest > end):
        end = latest
    end = end.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
    start = end - dt.timedelta(minutes=minutes)
    rows = dict(
        Event.objects.filter(time__gte=start, time__lt=end).annotate(m=TruncMinute("time"))
        .order_by().values("m").annotate(n=Count("id")).values_list("m", "n")
    )
    out = []
    for i in range(minutes):
        m = start + dt.timedelta(minutes=i)
        out.append((m, rows.get(m, 0)))
    return end, out
