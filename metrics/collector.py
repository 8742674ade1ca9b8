"""The /metrics collector (SPEC R21): every value read from the database at scrape
time, so every process (web, engine) serves the same numbers.

Naming follows Prometheus' conventions: prefix ``hadash_``, base units (seconds),
``_total`` only on counters, states as labelled gauges with every state present (0 or
more, so a state that empties drops to 0 instead of vanishing). docs/metrics.md lists
every metric.

Histograms (detection, fence, VM downtime) are computed from the incident tables by
one aggregate query each — a filtered COUNT per bucket plus SUM and COUNT — over every
incident still stored (not a window of recent days): a Prometheus histogram is
cumulative, and a window would make its counts fall as incidents age out, which
``rate()`` reads as counter resets. Only the cleanup of old incidents lowers them.
"""

from __future__ import annotations

import datetime as dt
import itertools
import platform
from pathlib import Path

import django
from django.apps import apps
from django.conf import settings
from django.db import DatabaseError, transaction
from django.db.models import Count, DurationField, ExpressionWrapper, F, Q, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from hadash import config
from hadash.choices import (
    FINAL_STEPS,
    OPEN_INCIDENT_STATES,
    AlertState,
    IncidentKind,
    Severity,
    Step,
    WorkType,
)
from hadash.ha.runtime import HEARTBEAT_TTL, SWEEPER
from hadash.models import Alert, EngineProcess, HaWork, Incident, IncidentVm, Lease
from hosts.choices import SWEPT_STATUSES, UNWATCHED_HOST_TYPES, HostStatus
from hosts.models import Host
from vms.choices import VmState
from vms.models import VMInstance

from . import counters

PREFIX = "hadash_"
# Bucket upper bounds (seconds). Detection: ping.interval × ping.timeout is 25 s by
# default; fencing: a BMC answers in seconds; downtime: detection + fence + boot.
DETECTION_BUCKETS = (1, 2, 5, 10, 15, 20, 25, 30, 45, 60, 90, 120, 300, 600)
FENCE_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
DOWNTIME_BUCKETS = (5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1800, 3600)
HA_MODES = ("armed", "observe", "disarmed")
UNFINISHED_STEPS = tuple(s for s in Step.values if s not in FINAL_STEPS)


def _seconds(value) -> float:
    if value is None:
        return 0.0
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    return float(value) / 1e6  # a backend without a duration type: microseconds


def _revision() -> str:
    """The git commit this tree runs (read from .git without running git), or ''."""
    git = Path(settings.BASE_DIR) / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head[5:]
        path = git / ref
        if path.exists():
            return path.read_text().strip()[:12]
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0][:12]
    except OSError:
        pass
    return ""


_BUILD: dict[str, str] = {}


def build_labels() -> dict[str, str]:
    if not _BUILD:
        _BUILD.update(
            version=settings.SPECTACULAR_SETTINGS.get("VERSION", ""),
            revision=_revision(),
            python=platform.python_version(),
            django=django.get_version(),
        )
    return _BUILD


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, labels=labels)


def _count_gauge(name: str, doc: str, qs, fields: list[str], *values) -> GaugeMetricFamily:
    """A gauge of the rows of ``qs`` counted by ``fields`` (also its labels) in one query,
    with a sample for every combination of ``values`` (one list per field; 0 where no row)."""
    counts = {tuple(row[:-1]): row[-1]
              for row in qs.values_list(*fields).annotate(n=Count("id"))}
    g = _gauge(name, doc, fields)
    for key in itertools.product(*values):
        g.add_metric([str(v) for v in key], counts.get(key, 0))
    return g


class HadashCollector(Collector):
    """Reads the database on every ``collect()`` (one scrape)."""

    def collect(self):
        now = timezone.now()
        cfg = config.snapshot()
        yield from self._hosts(now, cfg)
        yield self._vms()
        yield self._ha_items()
        yield from self._incidents()
        yield from self._histograms()
        yield from self._counters()
        yield from self._engine(now)
        yield from self._alerts()
        yield from self._failover()
        yield self._ha_mode(cfg)
        build = build_labels()
        info = _gauge("build_info", "hadash build: version, git revision, Python, Django.",
                      list(build))
        info.add_metric(list(build.values()), 1)
        yield info

    # --- state gauges -----------------------------------------------------------------

    def _hosts(self, now, cfg):
        rows = Host.objects.values_list("cluster", "status").annotate(n=Count("id"))
        counts = {(c, s): n for c, s, n in rows}
        clusters = sorted({c for c, _ in counts})
        hosts = _gauge("hosts", "Hosts by cluster and status (every status present).",
                       ["cluster", "status"])
        for cluster in clusters:
            for status in HostStatus.values:
                hosts.add_metric([cluster, status], counts.get((cluster, status), 0))
        yield hosts

        cutoff = now - dt.timedelta(seconds=cfg["ping.interval"] * cfg["ping.timeout"])
        behind_rows = dict(
            Host.objects.filter(status__in=SWEPT_STATUSES, last_ping__lt=cutoff)
            .exclude(type__in=UNWATCHED_HOST_TYPES)
            .values_list("cluster").annotate(n=Count("id"))
        )
        behind = _gauge(
            "hosts_behind_on_ping",
            "Up or Connecting hosts whose last ping is older than ping.interval × "
            "ping.timeout: failures not declared yet (R17 suspect).", ["cluster"])
        for cluster in clusters:
            behind.add_metric([cluster], behind_rows.get(cluster, 0))
        yield behind

    def _vms(self):
        return _count_gauge("vms", "VMs by state (every state present).",
                            VMInstance.objects.all(), ["state"], VmState.values)

    def _ha_items(self):
        return _count_gauge("ha_items", "Unfinished HA work items by type and step.",
                            HaWork.objects.exclude(step__in=FINAL_STEPS), ["type", "step"],
                            WorkType.values, UNFINISHED_STEPS)

    def _incidents(self):
        yield _count_gauge("open_incidents", "Incidents not ended (R18), by kind and state.",
                           Incident.objects.filter(state__in=OPEN_INCIDENT_STATES),
                           ["kind", "state"], IncidentKind.values, OPEN_INCIDENT_STATES)

    # --- histograms -------------------------------------------------------------------

    @staticmethod
    def _histogram(name, doc, qs, end, start, bounds, by=None):
        """One histogram family from one aggregate query (grouped by ``by``)."""
        duration = ExpressionWrapper(F(end) - start, output_field=DurationField())
        qs = qs.filter(**{f"{end}__isnull": False}).annotate(_start=start) \
            .filter(_start__isnull=False).annotate(_d=duration)
        aggs = {
            f"b{i}": Count("pk", filter=Q(_d__lte=dt.timedelta(seconds=b)))
            for i, b in enumerate(bounds)
        }
        aggs.update(n=Count("pk"), s=Sum("_d"))
        labels = [by] if by else []
        family = HistogramMetricFamily(PREFIX + name, doc, labels=labels)
        if by:
            rows = {r[by]: r for r in qs.values(by).annotate(**aggs).order_by()}
            groups = [(k, rows.get(k)) for k in IncidentKind.values]
        else:
            groups = [(None, qs.aggregate(**aggs))]
        for key, row in groups:
            row = row or {}
            buckets = [(floatToGoString(b), row.get(f"b{i}") or 0)
                       for i, b in enumerate(bounds)]
            buckets.append(("+Inf", row.get("n") or 0))
            family.add_metric([key] if by else [], buckets, _seconds(row.get("s")))
        return family

    def _histograms(self):
        yield self._histogram(
            "incident_detection_seconds",
            "Seconds from an incident's start (last ping / last power confirmation) to "
            "its detection (R18).",
            Incident.objects.all(), "detected_at", F("started_at"), DETECTION_BUCKETS,
            by="kind")
        yield self._histogram(
            "incident_fence_seconds",
            "Seconds from a host's failure being declared (or detected) to its fencing.",
            Incident.objects.filter(kind=IncidentKind.HOST), "fenced_at",
            Coalesce("declared_at", "detected_at"), FENCE_BUCKETS)
        yield self._histogram(
            "vm_downtime_seconds",
            "Seconds a VM of an incident was down: last confirmation to Running again "
            "(R18), by the incident's kind.",
            IncidentVm.objects.annotate(kind=F("incident__kind")), "running_at",
            F("down_since"), DOWNTIME_BUCKETS, by="kind")

    # --- counters ---------------------------------------------------------------------

    def _counters(self):
        totals = counters.totals()
        for name, (label_names, doc) in counters.KNOWN.items():
            family = CounterMetricFamily(PREFIX + name, doc, labels=list(label_names))
            seen: dict[tuple, int] = {}
            for (n, labels), value in totals.items():
                if n == name:
                    parsed = counters.parse_labels(labels)
                    seen[tuple(parsed.get(k, "") for k in label_names)] = value
            if label_names:
                # The documented outcomes are always present (0 until counted).
                values = counters.KNOWN_VALUES.get(name, {}).get(label_names[0], ())
                for v in values:
                    seen.setdefault((v,), 0)
            else:
                seen.setdefault((), 0)
            for key in sorted(seen):
                family.add_metric(list(key), seen[key])
            yield family

    # --- engine and alerts --------------------------------------------------------------

    def _engine(self, now):
        lease = Lease.objects.filter(name=SWEEPER).values("holder", "expires").first()
        up = bool(lease and lease["holder"] and lease["expires"] and lease["expires"] >= now)
        g = _gauge("sweeper_up", "1 while an engine loop holds a fresh sweeper lease "
                   "(hosts are being watched), else 0.", [])
        g.add_metric([], 1 if up else 0)
        yield g
        loops = EngineProcess.objects.filter(heartbeat__gte=now - HEARTBEAT_TTL).count()
        g = _gauge("engine_loops", "Engine loops with a fresh heartbeat.", [])
        g.add_metric([], loops)
        yield g

    def _alerts(self):
        counts = dict(Alert.objects.filter(state=AlertState.OPEN)
                      .values_list("severity").annotate(n=Count("id")))
        g = _gauge("open_alerts", "Open alerts (R19) by severity.", ["severity"])
        for severity in Severity.values:
            g.add_metric([severity], counts.get(severity, 0))
        yield g
        backlog = Alert.objects.filter(state=AlertState.OPEN, kind__icontains="backlog").exists()
        g = _gauge(
            "ingestion_backlog",
            "1 while an ingestion backlog alert is open (some process's oldest waiting "
            "ping is older than its limit), else 0.", [])
        g.add_metric([], 1 if backlog else 0)
        yield g

    # --- failover plan and HA mode ------------------------------------------------------

    def _failover(self):
        """R22's failover capacity per cluster, from the stored plans (clusters app)
        when it is installed; no sample otherwise."""
        try:
            model = apps.get_model("clusters", "FailoverPlan")
        except LookupError:
            return
        fields = {f.name for f in model._meta.get_fields()}
        name = next((f for f in ("cluster", "cluster_name", "name") if f in fields), None)
        if name is None or "capacity" not in fields:
            return
        wanted = [name, "capacity"] + (["level"] if "level" in fields else [])
        qs = model.objects.values(*wanted)
        if "computed_at" in fields:
            qs = qs.order_by("computed_at")  # several rows per cluster: the newest wins
        try:
            with transaction.atomic():
                plans = {row[name]: row for row in qs}
        except DatabaseError:  # not migrated yet
            return
        capacity = _gauge("cluster_failover_capacity",
                          "Hosts of the cluster that may fail at once with every HA VM "
                          "still fitting (R22, 0–3).", ["cluster"])
        level = _gauge("cluster_failover_level",
                       "The failover level wanted (ha.failover.level, R23).", ["cluster"])
        for cluster in sorted(plans, key=str):
            row = plans[cluster]
            capacity.add_metric([str(cluster)], row["capacity"] or 0)
            if row.get("level") is not None:
                level.add_metric([str(cluster)], row["level"])
        yield capacity
        if "level" in fields:
            yield level

    def _ha_mode(self, cfg):
        try:
            mode = cfg["ha.mode"]
        except (KeyError, config.ConfigError):
            mode = "armed"
        g = _gauge("ha_mode", "The installation's HA mode (R26): 1 for the mode in force.",
                   ["mode"])
        for m in HA_MODES:
            g.add_metric([m], 1 if m == mode else 0)
        return g
