"""Incidents for the dashboard (R18), read from the ``incident`` table the engine keeps
(hadash.incidents opens, progresses and closes them in the transactions of the changes).

- ``incident_page``: one page of incidents, newest first, filtered by state, kind,
  cluster and time range, each with its detection time (detected − started) and the
  min / median / max downtime of its VMs (IncidentVm: last confirmation → Running
  again). A fixed number of queries whatever the page size: the page, its total, the
  VMs of the page's incidents, the clusters for the filter.
- ``incident_detail``: one incident with its VMs, its events (the timeline), its HA
  items and its alert, in a fixed number of queries too.
- ``events_per_minute``: the activity chart.
"""

from __future__ import annotations

import datetime as dt
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from urllib.parse import urlencode

from django.contrib.auth.decorators import login_required
from django.db.models import Count, Max
from django.db.models.functions import TruncMinute
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from hadash.choices import IncidentKind, IncidentState, VmOutcome
from hadash.models import Event, HaWork, Incident, IncidentVm

from .templatetags.dash import duration

PAGE_SIZE = 50
TIMELINE_CAP = 1000  # events shown on a detail page (a story has a few dozen)
WORK_CAP = 1000
RANGES = {"1h": dt.timedelta(hours=1), "24h": dt.timedelta(days=1),
          "7d": dt.timedelta(days=7), "30d": dt.timedelta(days=30)}


class FilterError(ValueError):
    """A filter value that cannot be used (shown to the operator, nothing filtered)."""


def _when(text: str, name: str, *, end: bool = False) -> dt.datetime:
    """An ISO date or date-time; a date alone is its midnight (``end``: the next one)."""
    value = parse_datetime(text)
    if value is None:
        day = None
        try:
            day = parse_date(text)
        except ValueError:
            pass
        if day is None:
            raise FilterError(f"{name}: {text!r} is not a date (YYYY-MM-DD) or an ISO "
                              f"date-time")
        value = dt.datetime.combine(day + dt.timedelta(days=1 if end else 0), dt.time())
    if timezone.is_naive(value):
        value = timezone.make_aware(value, dt.UTC)
    return value


@dataclass
class Filters:
    state: str = ""
    kind: str = ""
    cluster: str = ""
    range: str = ""  # one of RANGES, or "" (any time)
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    page: int = 1
    errors: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, query, now=None) -> Filters:
        """From the page's query string; a bad value is reported and ignored."""
        f = cls()
        now = now or timezone.now()

        def get(k: str) -> str:
            return (query.get(k) or "").strip()

        f.raw = {k: get(k) for k in ("state", "kind", "cluster", "range", "since", "until")}
        if get("state"):
            if get("state") == "open" or get("state") in IncidentState.values:
                f.state = get("state")
            else:
                f.errors.append(f"state: {get('state')!r} is not one of open, "
                                f"{', '.join(IncidentState.values)}")
        if get("kind"):
            if get("kind") in IncidentKind.values:
                f.kind = get("kind")
            else:
                f.errors.append(f"kind: {get('kind')!r} is not host or vm")
        f.cluster = get("cluster")[:255]
        if get("range"):
            if get("range") in RANGES:
                f.range = get("range")
                f.since = now - RANGES[f.range]
            else:
                f.errors.append(f"range: {get('range')!r} is not one of {', '.join(RANGES)}")
        for name in ("since", "until"):
            if get(name):
                try:
                    setattr(f, name, _when(get(name), name, end=name == "until"))
                except FilterError as exc:
                    f.errors.append(str(exc))
        try:
            f.page = max(1, min(int(get("page") or 1), 10**6))
        except ValueError:
            f.errors.append(f"page: {get('page')!r} is not a number")
        return f

    def apply(self, qs):
        if self.state == "open":
            qs = qs.filter(state__in=(IncidentState.OPEN, IncidentState.RECOVERING))
        elif self.state:
            qs = qs.filter(state=self.state)
        if self.kind:
            qs = qs.filter(kind=self.kind)
        if self.cluster:
            qs = qs.filter(cluster=self.cluster)
        if self.since:
            qs = qs.filter(detected_at__gte=self.since)
        if self.until:
            qs = qs.filter(detected_at__lt=self.until)
        return qs

    def url(self, **change) -> str:
        """The page's query string with ``change`` applied (page back to 1 unless given)."""
        params = {k: v for k, v in self.raw.items() if v}
        params.pop("page", None)
        for k, v in change.items():
            if v in ("", None):
                params.pop(k, None)
            else:
                params[k] = v
        if params.get("range"):
            params.pop("since", None)
        return "?" + urlencode(params) if params else "?"


@dataclass
class Downtime:
    """Per-VM downtime of one incident (seconds): what R18 measures."""

    values: list[float] = field(default_factory=list)

    @property
    def min(self) -> float | None:
        return min(self.values) if self.values else None

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    @property
    def max(self) -> float | None:
        return max(self.values) if self.values else None


def seconds(a: dt.datetime | None, b: dt.datetime | None) -> float | None:
    """b − a in seconds (None when either is unknown)."""
    if a is None or b is None:
        return None
    return (b - a).total_seconds()


def detection_seconds(inc: Incident) -> float | None:
    """Detection time: from the last sign of life (started) to the detection."""
    return seconds(inc.started_at, inc.detected_at)


def downtimes(incident_ids: list[int]) -> dict[int, Downtime]:
    """Downtime of every VM back Running, per incident: one query."""
    out: dict[int, Downtime] = defaultdict(Downtime)
    if not incident_ids:
        return out
    rows = (IncidentVm.objects.filter(incident_id__in=incident_ids, down_since__isnull=False,
                                      running_at__isnull=False)
            .values_list("incident_id", "down_since", "running_at"))
    for iid, down, up in rows:
        out[iid].values.append((up - down).total_seconds())
    return out


@dataclass
class Row:
    """One incident of the list, with what the page computes for it."""

    inc: Incident
    downtime: Downtime

    @property
    def detection(self) -> float | None:
        return detection_seconds(self.inc)

    @property
    def subject(self) -> str:
        return self.inc.host_name if self.inc.kind == IncidentKind.HOST else self.inc.vm_name


@dataclass
class Page:
    rows: list[Row]
    total: int
    number: int
    pages: int
    filters: Filters
    clusters: list[str]

    @property
    def has_next(self) -> bool:
        return self.number < self.pages

    @property
    def has_previous(self) -> bool:
        return self.number > 1


def subject_name(inc: Incident) -> str:
    return inc.host_name if inc.kind == IncidentKind.HOST else inc.vm_name


def incident_page(filters: Filters, page_size: int = PAGE_SIZE) -> Page:
    """One page of incidents, newest first, in four queries."""
    qs = filters.apply(Incident.objects.all()).order_by("-detected_at", "-id")
    total = qs.count()
    pages = max(1, -(-total // page_size))
    number = min(filters.page, pages)
    incs = list(qs[(number - 1) * page_size: number * page_size])
    dts = downtimes([i.pk for i in incs])
    clusters = list(Incident.objects.exclude(cluster="").order_by("cluster")
                    .values_list("cluster", flat=True).distinct()[:500])
    return Page(rows=[Row(i, dts[i.pk]) for i in incs], total=total, number=number,
                pages=pages, filters=filters, clusters=clusters)


@dataclass
class Detail:
    inc: Incident
    vms: list[IncidentVm]
    timeline: list[dict]
    timeline_total: int
    work: list[HaWork]
    alert: object | None
    downtime: Downtime

    @property
    def detection(self) -> float | None:
        return detection_seconds(self.inc)

    @property
    def subject(self) -> str:
        return subject_name(self.inc)

    @property
    def outcome(self) -> str:
        """One line an operator reads first."""
        i = self.inc
        if i.state == IncidentState.DISMISSED:
            return "Dismissed: the host came back before anything had to be done."
        restarted = sum(1 for v in self.vms if v.outcome == VmOutcome.RESTARTED)
        failed = sum(1 for v in self.vms if v.outcome == VmOutcome.FAILED)
        pending = sum(1 for v in self.vms if v.outcome == VmOutcome.PENDING)
        observed = sum(1 for v in self.vms if v.outcome == VmOutcome.OBSERVED)
        parts = [f"{restarted} of {i.vms_affected} HA VM(s) restarted"]
        if observed:  # R26: not restarted because HA only watched; say so
            parts.append(f"{observed} only observed (observe mode: nothing was done)")
        if failed:
            parts.append(f"{failed} failed")
        if pending:
            parts.append(f"{pending} still pending")
        if self.downtime.max is not None:
            parts.append(f"longest downtime {duration(self.downtime.max)}")
        return f"{i.state}: " + ", ".join(parts) + "."


TIMELINE_VALUES = ("id", "time", "subject", "subject_id", "subject_name", "event", "field",
                   "old", "new", "reason", "message", "alert", "severity", "host_id", "vm_id")


def incident_detail(pk: int) -> Detail | None:
    """One incident and its story, in six queries (incident + alert, VMs, events and
    their count, HA items)."""
    inc = Incident.objects.select_related("alert").filter(pk=pk).first()
    if inc is None:
        return None
    vms = list(IncidentVm.objects.filter(incident=inc).order_by("id"))
    events = Event.objects.filter(incident=inc)
    timeline = list(events.order_by("time", "id").values(*TIMELINE_VALUES)[:TIMELINE_CAP])
    total = len(timeline) if len(timeline) < TIMELINE_CAP else events.count()
    work = list(HaWork.objects.filter(incident=inc).select_related("instance", "host",
                                                                   "target_host")
                .order_by("id")[:WORK_CAP])
    try:
        alert = inc.alert
    except Incident.alert.RelatedObjectDoesNotExist:
        alert = None
    dt_ = Downtime([d for v in vms if (d := v.downtime) is not None])
    return Detail(inc=inc, vms=vms, timeline=timeline, timeline_total=total, work=work,
                  alert=alert, downtime=dt_)


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


# --- pages ---------------------------------------------------------------------------


def downtime_chart(rows: list[Row]):
    """Longest VM downtime of each incident of the page that has one, oldest left."""
    from . import charts

    bars = [r for r in rows if r.downtime.max is not None][:40][::-1]
    return charts.bar_chart(
        [charts.Bar(value=r.downtime.max, cls=f"k-{r.inc.kind}",
                    label=r.subject if len(bars) <= 12 else "",
                    title=f"#{r.inc.pk} {r.subject} ({r.inc.kind} failure, "
                          f"{r.inc.detected_at:%Y-%m-%d %H:%M:%S}): downtime "
                          f"{r.downtime.max:.0f} s",
                    href=f"#inc-{r.inc.pk}")
         for r in bars],
        chart_id="chart-downtime", unit=" s",
        label="Longest VM downtime per incident (s)",
        empty="No VM of these incidents is back Running yet.",
    )


@login_required
def incidents_page(request):
    """``/incidents``: the incident table (R18), filtered and paged."""
    from . import charts
    from .views import page as render_page

    filters = Filters.parse(request.GET)
    p = incident_page(filters)
    end, per_min = events_per_minute(60)
    epm_chart = charts.bar_chart(
        [charts.Bar(value=n, title=f"{m:%H:%M}: {n} events",
                    label=f"{m:%H:%M}" if i % 10 == 0 else "")
         for i, (m, n) in enumerate(per_min)],
        chart_id="chart-epm", label="Events per minute", height=120,
    )
    all_dt = [v for r in p.rows for v in r.downtime.values]
    states = [("", "any"), ("open", "open (Open or Recovering)")] + [
        (s, s) for s in IncidentState.values]
    ctx = {
        "p": p, "f": filters,
        "states": [(s, label, filters.url(state=s)) for s, label in states],
        "kinds": [(k, label, filters.url(kind=k))
                  for k, label in (("", "any"), ("host", "host"), ("vm", "VM"))],
        "ranges": [(r, r or "any time", filters.url(range=r)) for r in ("", *RANGES)],
        "prev_url": filters.url(page=p.number - 1) if p.has_previous else "",
        "next_url": filters.url(page=p.number + 1) if p.has_next else "",
        "downtime_chart": downtime_chart(p.rows),
        "downtime_median": statistics.median(all_dt) if all_dt else None,
        "downtime_max": max(all_dt) if all_dt else None,
        "epm_chart": epm_chart, "epm_end": end, "epm_total": sum(n for _, n in per_min),
    }
    return render_page(request, "dashboard/incidents.html", "incidents", ctx)


@login_required
def incident_view(request, pk: int):
    """``/incidents/<id>``: one incident's story (R18) and its alert (R19)."""
    from django.http import Http404

    from .views import page as render_page

    d = incident_detail(pk)
    if d is None:
        raise Http404(f"No incident {pk}.")
    return render_page(request, "dashboard/incident.html", "incident", {"d": d})
