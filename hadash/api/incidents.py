"""Operator API for incidents (R18) and alerts (R19), mounted under /api/v1/
(hadash.api.urls):

    GET  /incidents                 newest first; filters state, kind, cluster, since, until
    GET  /incidents/{id}            with its VMs (downtime), timeline (events), HA items, alert
    GET  /alerts                    newest first; filters state, severity, kind, acknowledged
    GET  /alerts/{id}
    POST /alerts/{id}/acknowledge   admins (a read-only token is a 403)

Same conventions as the rest of the API (hadash.api.views): bearer token or session,
admins act, errors are ``{"error": ...}``, a refused request changes nothing. The
engine (hadash.incidents, hadash.alerts) writes these tables; the API only reads them
and records acknowledgements.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from django.urls import path
from django.utils import timezone
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers

from hadash import alerts as hadash_alerts
from hadash.choices import (
    OPEN_INCIDENT_STATES,
    AlertState,
    IncidentKind,
    IncidentState,
    Severity,
    VmOutcome,
    WorkType,
)
from hadash.models import Alert, Event, HaWork, Incident, IncidentVm

from . import pagination
from .filters import MAX_ID, ListParams, WholeNumberField, apply_lookups
from .serializers import EventSerializer
from .views import E400, E401, READ_ERRORS, WRITE_ERRORS, ApiView, Response, _get

TIMELINE_CAP = 1000


def _choices(values) -> str:
    return ", ".join(str(v) for v in values)


# --- serializers --------------------------------------------------------------


class DowntimeSerializer(serializers.Serializer):
    """Per-VM downtime of an incident (R18: last confirmation → Running again), over
    its VMs that are Running again; null while none is."""

    min = serializers.FloatField(allow_null=True, help_text="Seconds.")
    median = serializers.FloatField(allow_null=True, help_text="Seconds.")
    max = serializers.FloatField(allow_null=True, help_text="Seconds.")
    count = serializers.IntegerField(help_text="VMs back Running.")


class IncidentSerializer(serializers.ModelSerializer):
    kind = serializers.CharField(read_only=True,
                                 help_text=f"One of {_choices(IncidentKind.values)}.")
    state = serializers.CharField(
        read_only=True, help_text=f"One of {_choices(IncidentState.values)} (R18).")
    host = serializers.CharField(source="host_name", read_only=True,
                                 help_text="The failed host, or the VM's host.")
    vm = serializers.CharField(source="vm_name", read_only=True,
                               help_text="The failed VM (VM incidents); empty otherwise.")
    detection_seconds = serializers.SerializerMethodField(
        help_text="detected_at − started_at (last sign of life), seconds.")
    downtime = serializers.SerializerMethodField()
    alert = serializers.SerializerMethodField(help_text="Id of the incident's alert.")

    class Meta:
        model = Incident
        fields = [
            "id", "kind", "state", "title", "host", "vm", "cluster", "started_at",
            "detected_at", "declared_at", "fenced_at", "first_restart_at",
            "last_restart_at", "resolved_at", "vms_affected", "vms_restarted", "vms_failed",
            "detection_seconds", "downtime", "alert", "updated",
        ]
        read_only_fields = fields

    def get_detection_seconds(self, obj) -> float | None:
        if obj.started_at is None:
            return None
        return (obj.detected_at - obj.started_at).total_seconds()

    @extend_schema_field(DowntimeSerializer)
    def get_downtime(self, obj) -> dict:
        values = self.context.get("downtimes", {}).get(obj.pk, [])
        return downtime_summary(values)

    def get_alert(self, obj) -> int | None:
        return self.context.get("alerts", {}).get(obj.pk)


class IncidentVmSerializer(serializers.ModelSerializer):
    vm = serializers.CharField(source="vm_name", read_only=True)
    outcome = serializers.CharField(read_only=True,
                                    help_text=f"One of {_choices(VmOutcome.values)}.")
    downtime_seconds = serializers.FloatField(
        source="downtime", read_only=True, allow_null=True,
        help_text="running_at − down_since, seconds (null until Running again).")
    target_host = serializers.CharField(source="target_host_name", read_only=True)

    class Meta:
        model = IncidentVm
        fields = ["vm", "ha", "outcome", "down_since", "running_at", "downtime_seconds",
                  "target_host", "detail"]
        read_only_fields = fields


class IncidentWorkSerializer(serializers.ModelSerializer):
    vm = serializers.CharField(source="instance.name", read_only=True)
    type = serializers.CharField(read_only=True,
                                 help_text=f"One of {_choices(WorkType.values)}.")
    target_host = serializers.SlugRelatedField(slug_field="name", read_only=True,
                                               allow_null=True)

    class Meta:
        model = HaWork
        fields = ["id", "vm", "type", "step", "reason", "tried", "target_host", "waiting",
                  "placement", "created", "updated", "last_error"]
        read_only_fields = fields


class AlertSerializer(serializers.ModelSerializer):
    state = serializers.CharField(read_only=True,
                                  help_text=f"One of {_choices(AlertState.values)}.")
    incident = serializers.PrimaryKeyRelatedField(
        read_only=True, allow_null=True, help_text="The incident (R19: one alert each).")

    class Meta:
        model = Alert
        fields = ["id", "kind", "subject", "subject_name", "cluster", "severity", "state",
                  "title", "message", "count", "incident", "opened_at", "updated_at",
                  "resolved_at", "acknowledged_at", "acknowledged_by"]
        read_only_fields = fields


class IncidentDetailSerializer(IncidentSerializer):
    vms = serializers.SerializerMethodField()
    timeline = serializers.SerializerMethodField(
        help_text=f"Its events, oldest first (at most {TIMELINE_CAP}).")
    ha_work = serializers.SerializerMethodField(help_text="Its HA items, oldest first.")
    alert_detail = serializers.SerializerMethodField()

    class Meta(IncidentSerializer.Meta):
        fields = [*IncidentSerializer.Meta.fields, "vms", "timeline", "ha_work",
                  "alert_detail"]
        read_only_fields = fields

    @extend_schema_field(IncidentVmSerializer(many=True))
    def get_vms(self, obj) -> list:
        return IncidentVmSerializer(self.context["vms"], many=True).data

    @extend_schema_field(EventSerializer(many=True))
    def get_timeline(self, obj) -> list:
        return EventSerializer(self.context["timeline"], many=True).data

    @extend_schema_field(IncidentWorkSerializer(many=True))
    def get_ha_work(self, obj) -> list:
        return IncidentWorkSerializer(self.context["work"], many=True).data

    @extend_schema_field(AlertSerializer(allow_null=True))
    def get_alert_detail(self, obj) -> dict | None:
        a = self.context.get("alert")
        return AlertSerializer(a).data if a is not None else None


# --- query parameters ---------------------------------------------------------


class IncidentParams(ListParams):
    state = serializers.ChoiceField(
        choices=["open", *IncidentState.values], required=False,
        help_text="open: Open or Recovering.")
    kind = serializers.ChoiceField(choices=IncidentKind.values, required=False)
    cluster = serializers.CharField(required=False, max_length=255)
    since = serializers.DateTimeField(required=False,
                                      help_text="Detected at or after (ISO 8601).")
    until = serializers.DateTimeField(required=False, help_text="Detected before (ISO 8601).")

    lookups = {"kind": "kind", "cluster": "cluster", "since": "detected_at__gte",
               "until": "detected_at__lt"}


class AlertParams(ListParams):
    state = serializers.ChoiceField(choices=AlertState.values, required=False)
    severity = serializers.ChoiceField(choices=Severity.choices, required=False)
    kind = serializers.CharField(required=False, max_length=64)
    acknowledged = serializers.BooleanField(required=False)
    incident = WholeNumberField(required=False, min_value=1, max_value=MAX_ID)

    lookups = {"state": "state", "severity": "severity", "kind": "kind",
               "incident": "incident_id"}


# --- helpers ------------------------------------------------------------------


def downtime_summary(values: list[float]) -> dict:
    if not values:
        return {"min": None, "median": None, "max": None, "count": 0}
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "count": len(values)}


def page_context(incidents: list[Incident]) -> dict:
    """Downtimes and alert ids of a page of incidents: two queries."""
    ids = [i.pk for i in incidents]
    downtimes: dict[int, list[float]] = defaultdict(list)
    for iid, down, up in (IncidentVm.objects.filter(incident_id__in=ids,
                                                   down_since__isnull=False,
                                                   running_at__isnull=False)
                          .values_list("incident_id", "down_since", "running_at")):
        downtimes[iid].append((up - down).total_seconds())
    alerts = dict(Alert.objects.filter(incident_id__in=ids).values_list("incident_id", "id"))
    return {"downtimes": downtimes, "alerts": alerts}


def alert_for_event(event: Event) -> Alert | None:
    """The alert an old-style event acknowledgement stands for: its incident's alert,
    or for an ``AlertOpened``/``AlertResolved`` event the alert it opened."""
    if event.incident_id:
        return Alert.objects.filter(incident_id=event.incident_id).first()
    if event.event in ("AlertOpened", "AlertResolved"):
        key = hadash_alerts.key_of(event.new, event.subject, event.subject_name)
        return (Alert.objects.filter(key=key, opened_at__lte=event.time)
                .order_by("-id").first())
    return None


def acknowledge_for_event(event: Event, *, by: str, now) -> Alert | None:
    """``POST /events/{id}/acknowledge`` (kept for one release): acknowledge the alert
    the event belongs to, if any."""
    alert = alert_for_event(event)
    if alert is not None:
        hadash_alerts.acknowledge(Alert.objects.filter(pk=alert.pk), by=by, now=now)
    return alert


# --- views --------------------------------------------------------------------


class IncidentListView(ApiView):
    serializer_class = IncidentSerializer

    @extend_schema(
        summary="List incidents, newest first (R18)",
        description="Failure stories: a host found behind on ping, or a VM that powered off "
        "or went missing while Running. `downtime` summarises the per-VM downtime (last "
        "confirmation → Running again); `detection_seconds` is detected − started.",
        parameters=[IncidentParams, *pagination.HEADERS],
        responses={200: IncidentSerializer(many=True), 400: E400, 401: E401},
    )
    def get(self, request):
        p = self.params(IncidentParams)
        qs = apply_lookups(Incident.objects.all(), p, IncidentParams.lookups)
        if p.get("state") == "open":
            qs = qs.filter(state__in=OPEN_INCIDENT_STATES)
        elif p.get("state"):
            qs = qs.filter(state=p["state"])
        return pagination.paged(request, qs.order_by("-detected_at", "-id"), IncidentSerializer,
                                offset=p["offset"], limit=p["limit"], context=page_context)


class IncidentDetailView(ApiView):
    serializer_class = IncidentDetailSerializer
    queryset = Incident.objects.all()

    @extend_schema(summary="Show an incident: its VMs, timeline, HA items and alert",
                   responses={200: IncidentDetailSerializer, **READ_ERRORS})
    def get(self, request, pk: int):
        inc = _get(Incident.objects.all(), f"no incident {pk}", pk=pk)
        ctx = page_context([inc])
        ctx.update(
            vms=list(IncidentVm.objects.filter(incident=inc).order_by("id")),
            timeline=list(Event.objects.filter(incident=inc)
                          .order_by("time", "id")[:TIMELINE_CAP]),
            work=list(HaWork.objects.filter(incident=inc)
                      .select_related("instance", "target_host").order_by("id")),
            alert=Alert.objects.filter(incident=inc).first(),
        )
        return Response(IncidentDetailSerializer(inc, context=ctx).data)


class AlertListView(ApiView):
    serializer_class = AlertSerializer

    @extend_schema(
        summary="List alerts, newest first (R19)",
        description="One alert per incident, updated as it progresses; other alerts one per "
        "(kind, subject) while open. Each resolves by itself; `state=open` lists the open "
        "ones, `acknowledged=false` the ones nobody acknowledged yet.",
        parameters=[AlertParams, *pagination.HEADERS],
        responses={200: AlertSerializer(many=True), 400: E400, 401: E401},
    )
    def get(self, request):
        p = self.params(AlertParams)
        qs = apply_lookups(Alert.objects.all(), p, AlertParams.lookups)
        if "acknowledged" in p:
            qs = qs.filter(acknowledged_at__isnull=not p["acknowledged"])
        return pagination.paged(request, qs.order_by("-id"), AlertSerializer,
                                offset=p["offset"], limit=p["limit"])


class AlertDetailView(ApiView):
    serializer_class = AlertSerializer
    queryset = Alert.objects.all()

    @extend_schema(summary="Show an alert", responses={200: AlertSerializer, **READ_ERRORS})
    def get(self, request, pk: int):
        return Response(AlertSerializer(_get(Alert.objects.all(), f"no alert {pk}",
                                             pk=pk)).data)


class AlertAcknowledgeView(ApiView):
    serializer_class = AlertSerializer
    queryset = Alert.objects.all()

    @extend_schema(
        summary="Acknowledge an alert",
        description="Records who saw it (the calling user) and when; the alert stays open "
        "until its cause ends. Acknowledging again changes nothing. Admins only.",
        request=None,
        responses={200: AlertSerializer, **WRITE_ERRORS},
    )
    def post(self, request, pk: int):
        alert = _get(Alert.objects.all(), f"no alert {pk}", pk=pk)
        hadash_alerts.acknowledge(Alert.objects.filter(pk=alert.pk), by=self.by(),
                                  now=timezone.now())
        alert.refresh_from_db()
        return Response(AlertSerializer(alert).data)


urlpatterns = [
    path("incidents", IncidentListView.as_view(), name="incident-list"),
    path("incidents/<int:pk>", IncidentDetailView.as_view(), name="incident-detail"),
    path("alerts", AlertListView.as_view(), name="alert-list"),
    path("alerts/<int:pk>", AlertDetailView.as_view(), name="alert-detail"),
    path("alerts/<int:pk>/acknowledge", AlertAcknowledgeView.as_view(),
         name="alert-acknowledge"),
]
