"""The operator REST API (PROTOCOL.md, Operator API): hosts, VMs, HA work, events,
configuration and operator actions.

Reads need any authenticated user (API token or session); writes and actions need a
staff user. Errors are `{"error": "<message>"}` (plus `details` per field for a
rejected body). Operator actions go through `hadash.ha.actions`, which commits each
change with its event; a refused action is 409 (400 when registering a VM).
"""

from __future__ import annotations

import logging

from django.db.models import BigIntegerField, Count, Q, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, status
from rest_framework.generics import GenericAPIView
from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import exception_handler as drf_exception_handler

from hadash import config
from hadash.choices import FINAL_STEPS
from hadash.ha import actions
from hadash.models import Configuration, Event, HaWork
from hadash.permissions import is_admin
from hosts.models import Host
from vms.choices import ACTIVE_STATES
from vms.models import VMInstance

from . import filters
from . import schema as _schema  # noqa: F401  (registers the BearerAuth scheme)
from .serializers import (
    HOST_SETTINGS,
    VM_SETTINGS,
    ConfigSerializer,
    ConfigUpdateSerializer,
    ErrorSerializer,
    EventSerializer,
    HaWorkSerializer,
    HostSerializer,
    HostSettingsSerializer,
    VMCreateSerializer,
    VMSerializer,
    VMSettingsSerializer,
    apply_settings,
)

log = logging.getLogger("hadash.api")


# --- errors -------------------------------------------------------------------


def _flatten(detail, prefix: str = "") -> list[str]:
    if isinstance(detail, dict):
        parts: list[str] = []
        for key, value in detail.items():
            name = "" if key == api_settings.NON_FIELD_ERRORS_KEY else str(key)
            sub = f"{prefix}.{name}" if prefix and name else (name or prefix)
            parts.extend(_flatten(value, sub))
        return parts
    if isinstance(detail, (list, tuple)):
        return [part for item in detail for part in _flatten(item, prefix)]
    return [f"{prefix}: {detail}" if prefix else str(detail)]


def api_exception_handler(exc, context):
    """DRF's handler, reshaped to `{"error": "..."}`; unexpected errors are a JSON 500."""
    response = drf_exception_handler(exc, context)
    if response is None:
        log.exception("operator API: unexpected error", exc_info=exc)
        return Response({"error": "internal server error"}, status=500)
    detail = response.data
    if isinstance(exc, exceptions.ValidationError):
        response.data = {"error": "; ".join(_flatten(detail)) or "invalid request"}
        if isinstance(detail, dict):
            response.data["details"] = detail
    elif isinstance(detail, dict) and "detail" in detail:
        response.data = {"error": str(detail["detail"])}
    else:
        response.data = {"error": "; ".join(_flatten(detail))}
    return response


def error(message: str, code: int) -> Response:
    return Response({"error": message}, status=code)


# --- permissions --------------------------------------------------------------


class StaffWrites(BasePermission):
    """Any authenticated user reads; writes and actions need an admin (staff,
    superuser or group "admins": hadash.permissions)."""

    message = ("this needs an admin (staff, or the group \"admins\"): read-only users can "
               "only read")

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not (user and user.is_authenticated):
            return False
        return request.method in SAFE_METHODS or is_admin(user)


class ApiView(GenericAPIView):
    permission_classes = [StaffWrites]

    def get_exception_handler(self):
        return api_exception_handler

    def params(self, serializer_class) -> dict:
        ser = serializer_class(data=self.request.query_params.dict())
        ser.is_valid(raise_exception=True)
        return ser.validated_data

    def by(self) -> str:
        return self.request.user.get_username()


def _get(queryset, message: str, **lookup):
    obj = queryset.filter(**lookup).first()
    if obj is None:
        raise exceptions.NotFound(message)
    return obj


E400 = OpenApiResponse(ErrorSerializer, description="Bad request; nothing was changed.")
E401 = OpenApiResponse(ErrorSerializer, description="Missing or wrong credentials.")
E403 = OpenApiResponse(ErrorSerializer, description="The user is not staff.")
E404 = OpenApiResponse(ErrorSerializer, description="No such object.")
E409 = OpenApiResponse(
    ErrorSerializer, description="The action is refused in the object's current state."
)
READ_ERRORS = {401: E401, 404: E404}
WRITE_ERRORS = {400: E400, 401: E401, 403: E403, 404: E404}


# --- hosts --------------------------------------------------------------------


def hosts_queryset():
    active = Q(vms__state__in=ACTIVE_STATES)
    return Host.objects.annotate(
        allocated_cpus=Coalesce(
            Sum("vms__cpus", filter=active), 0, output_field=BigIntegerField()
        ),
        allocated_memory_mb=Coalesce(
            Sum("vms__memory_mb", filter=active), 0, output_field=BigIntegerField()
        ),
        vm_count=Count("vms", filter=active),
    ).order_by("name")


def _host(name: str) -> Host:
    return _get(hosts_queryset(), f"no host named {name!r}", name=name)


class HostListView(ApiView):
    serializer_class = HostSerializer

    @extend_schema(
        summary="List hosts",
        parameters=[filters.HostParams],
        responses={200: HostSerializer(many=True), 400: E400, 401: E401},
    )
    def get(self, request):
        p = self.params(filters.HostParams)
        qs = filters.apply_lookups(hosts_queryset(), p, filters.HostParams.lookups)
        rows = qs[p["offset"]: p["offset"] + p["limit"]]
        return Response(HostSerializer(rows, many=True).data)


class HostDetailView(ApiView):
    serializer_class = HostSerializer

    @extend_schema(summary="Show a host", responses={200: HostSerializer, **READ_ERRORS})
    def get(self, request, name: str):
        return Response(HostSerializer(_host(name)).data)

    @extend_schema(
        summary="Change a host's operator-set fields",
        description="Tags and out-of-band management (Redfish BMC) settings; "
        f"settable: {', '.join(HOST_SETTINGS)}. The BMC password is write-only. "
        "Writes a `SettingsChanged` event.",
        request=HostSettingsSerializer,
        responses={200: HostSerializer, **WRITE_ERRORS},
    )
    def patch(self, request, name: str):
        host = _host(name)
        ser = HostSettingsSerializer(host, data=request.data, partial=True)
        ser.is_valid(raise_exception=True)
        apply_settings(host, ser.validated_data, by=self.by(), now=timezone.now())
        return Response(HostSerializer(_host(name)).data)


class HostActionView(ApiView):
    serializer_class = HostSerializer
    host_action = ""

    def run(self, host: Host, *, now, by: str) -> Host:
        if self.host_action == "enable":
            return actions.set_host_enabled(host, True, now=now, by=by)
        if self.host_action == "disable":
            return actions.set_host_enabled(host, False, now=now, by=by)
        if self.host_action == "maintenance":
            return actions.prepare_maintenance(host, now=now, by=by)
        if self.host_action == "cancel-maintenance":
            return actions.cancel_maintenance(host, now=now, by=by)
        raise AssertionError(self.host_action)

    @extend_schema(request=None, responses={200: HostSerializer, 409: E409, **WRITE_ERRORS})
    def post(self, request, name: str):
        host = _host(name)
        try:
            self.run(host, now=timezone.now(), by=self.by())
        except actions.ActionError as exc:
            return error(str(exc), status.HTTP_409_CONFLICT)
        return Response(HostSerializer(_host(name)).data)


class HostEnableView(HostActionView):
    """Enable the host (resource state Enabled): it takes VMs again."""

    host_action = "enable"


class HostDisableView(HostActionView):
    """Disable the host (resource state Disabled): no new VMs are placed on it."""

    host_action = "disable"


class HostMaintenanceView(HostActionView):
    """Prepare the host for maintenance: its VMs are migrated away, then it enters
    Maintenance (PrepareForMaintenance → Maintenance, or ErrorInMaintenance)."""

    host_action = "maintenance"


class HostCancelMaintenanceView(HostActionView):
    """Cancel maintenance: the host goes back to Enabled."""

    host_action = "cancel-maintenance"


# --- VMs ----------------------------------------------------------------------


def vms_queryset():
    return VMInstance.objects.select_related("host", "last_host", "power_host").order_by("name")


def _vm(name: str) -> VMInstance:
    return _get(vms_queryset(), f"no VM named {name!r}", name=name)


def production_engine():
    """The engine `start_vm` places and starts VMs with (tests replace this)."""
    from hadash.ha.engine import Engine

    return Engine.production()


class VMListView(ApiView):
    serializer_class = VMSerializer

    @extend_schema(
        summary="List VMs",
        parameters=[filters.VMParams],
        responses={200: VMSerializer(many=True), 400: E400, 401: E401},
    )
    def get(self, request):
        p = self.params(filters.VMParams)
        qs = filters.apply_lookups(vms_queryset(), p, filters.VMParams.lookups)
        rows = qs[p["offset"]: p["offset"] + p["limit"]]
        return Response(VMSerializer(rows, many=True).data)

    @extend_schema(
        summary="Register a VM",
        description="Registers a VM that runs on `host`: state Running, power state PowerOn. "
        "An unknown host or a name already in use is a 400 and nothing is written.",
        request=VMCreateSerializer,
        responses={201: VMSerializer, 400: E400, 401: E401, 403: E403},
    )
    def post(self, request):
        ser = VMCreateSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        d = ser.validated_data
        try:
            vm = actions.register_vm(
                name=d["name"],
                host_name=d["host"],
                cpus=d["cpus"],
                memory_mb=d["memory_mb"],
                ha_enabled=d["ha_enabled"],
                priority=d["priority"],
                type=d["type"],
                now=timezone.now(),
            )
        except actions.ActionError as exc:
            return error(str(exc), status.HTTP_400_BAD_REQUEST)
        return Response(VMSerializer(_vm(vm.name)).data, status=status.HTTP_201_CREATED)


class VMDetailView(ApiView):
    serializer_class = VMSerializer

    @extend_schema(summary="Show a VM", responses={200: VMSerializer, **READ_ERRORS})
    def get(self, request, name: str):
        return Response(VMSerializer(_vm(name)).data)

    @extend_schema(
        summary="Change a VM's operator-set fields",
        description=f"Settable: {', '.join(VM_SETTINGS)}. Writes a `SettingsChanged` event; "
        "state changes go through the start and stop actions.",
        request=VMSettingsSerializer,
        responses={200: VMSerializer, **WRITE_ERRORS},
    )
    def patch(self, request, name: str):
        vm = _vm(name)
        ser = VMSettingsSerializer(data=request.data, partial=True)
        ser.is_valid(raise_exception=True)
        apply_settings(vm, ser.validated_data, by=self.by(), now=timezone.now())
        return Response(VMSerializer(_vm(name)).data)


class VMStopView(ApiView):
    serializer_class = HaWorkSerializer

    @extend_schema(
        summary="Stop a VM",
        description="Queues a Stop work item (reason Operator); the VM stops when an HA "
        "worker runs it. Answers 202 with the work item.",
        request=None,
        responses={202: HaWorkSerializer, 409: E409, **WRITE_ERRORS},
    )
    def post(self, request, name: str):
        vm = _vm(name)
        try:
            work = actions.stop_vm(vm, now=timezone.now(), by=self.by())
        except actions.ActionError as exc:
            return error(str(exc), status.HTTP_409_CONFLICT)
        work = HaWork.objects.select_related("instance", "host", "target_host").get(pk=work.pk)
        return Response(HaWorkSerializer(work).data, status=status.HTTP_202_ACCEPTED)


class VMStartView(ApiView):
    serializer_class = VMSerializer

    @extend_schema(
        summary="Start a VM",
        description="Places and starts a stopped VM now (synchronously); answers with the VM.",
        request=None,
        responses={200: VMSerializer, 409: E409, **WRITE_ERRORS},
    )
    def post(self, request, name: str):
        vm = _vm(name)
        try:
            vm = actions.start_vm(vm, engine=production_engine(), by=self.by())
        except actions.ActionError as exc:
            return error(str(exc), status.HTTP_409_CONFLICT)
        return Response(VMSerializer(_vm(vm.name)).data)


# --- HA work ------------------------------------------------------------------


def work_queryset():
    return HaWork.objects.select_related("instance", "host", "target_host").order_by("-id")


class HaWorkListView(ApiView):
    serializer_class = HaWorkSerializer

    @extend_schema(
        summary="List HA work items, newest first",
        parameters=[filters.HaWorkParams],
        responses={200: HaWorkSerializer(many=True), 400: E400, 401: E401},
    )
    def get(self, request):
        p = self.params(filters.HaWorkParams)
        qs = filters.apply_lookups(work_queryset(), p, filters.HaWorkParams.lookups)
        if "finished" in p:
            qs = qs.filter(step__in=FINAL_STEPS) if p["finished"] else qs.unfinished()
        rows = qs[p["offset"]: p["offset"] + p["limit"]]
        return Response(HaWorkSerializer(rows, many=True).data)


class HaWorkDetailView(ApiView):
    serializer_class = HaWorkSerializer

    @extend_schema(summary="Show an HA work item", responses={200: HaWorkSerializer,
                                                              **READ_ERRORS})
    def get(self, request, pk: int):
        return Response(HaWorkSerializer(_get(work_queryset(), f"no HA work item {pk}",
                                              pk=pk)).data)


# --- events -------------------------------------------------------------------


class EventListView(ApiView):
    serializer_class = EventSerializer

    @extend_schema(
        summary="List events, oldest first",
        description="Events with an id greater than `after`, oldest first, at most `limit` "
        "of them (`latest=true`: the newest `limit` of them). To follow the feed, ask again "
        "with `after` set to the last id seen.",
        parameters=[filters.EventParams],
        responses={200: EventSerializer(many=True), 400: E400, 401: E401},
    )
    def get(self, request):
        p = self.params(filters.EventParams)
        qs = Event.objects.filter(id__gt=p["after"]).order_by("id")
        qs = filters.apply_lookups(qs, p, filters.EventParams.lookups)
        if "acknowledged" in p:
            qs = qs.filter(acknowledged_at__isnull=not p["acknowledged"])
        if p["latest"]:
            rows = list(qs.order_by("-id")[: p["limit"]])[::-1]
        else:
            rows = qs[: p["limit"]]
        return Response(EventSerializer(rows, many=True).data)


class EventDetailView(ApiView):
    serializer_class = EventSerializer

    @extend_schema(summary="Show an event", responses={200: EventSerializer, **READ_ERRORS})
    def get(self, request, pk: int):
        return Response(EventSerializer(_get(Event.objects, f"no event {pk}", pk=pk)).data)


class EventAcknowledgeView(ApiView):
    serializer_class = EventSerializer

    @extend_schema(
        summary="Acknowledge an alert",
        description="Marks the alert acknowledged (by the calling user). Acknowledging an "
        "acknowledged alert again changes nothing; an event that is not an alert is a 400.",
        request=None,
        responses={200: EventSerializer, **WRITE_ERRORS},
    )
    def post(self, request, pk: int):
        event = _get(Event.objects, f"no event {pk}", pk=pk)
        if not event.alert:
            return error(f"event {pk} is not an alert", status.HTTP_400_BAD_REQUEST)
        Event.objects.filter(pk=pk, acknowledged_at__isnull=True).update(
            acknowledged_at=timezone.now(), acknowledged_by=self.by()
        )
        event.refresh_from_db()
        return Response(EventSerializer(event).data)


# --- configuration ------------------------------------------------------------


def config_item(name: str, row: Configuration | None) -> dict:
    k = config.key(name)
    return {
        "name": k.name,
        "value": row.value if row is not None else k.default,
        "default": k.default,
        "type": k.type,
        "category": k.category,
        "description": k.description,
        "min": k.min,
        "max": k.max,
        "updated": row.updated if row is not None else None,
    }


class ConfigListView(ApiView):
    serializer_class = ConfigSerializer

    @extend_schema(
        summary="List configuration keys (SPEC §2)",
        responses={200: ConfigSerializer(many=True), 401: E401},
    )
    def get(self, request):
        rows = {r.name: r for r in Configuration.objects.all()}
        items = [config_item(name, rows.get(name)) for name in sorted(config.KEYS)]
        return Response(ConfigSerializer(items, many=True).data)


class ConfigDetailView(ApiView):
    serializer_class = ConfigSerializer

    def _key(self, name: str) -> config.Key:
        try:
            return config.key(name)
        except config.ConfigError as exc:
            raise exceptions.NotFound(str(exc)) from None

    def _item(self, name: str) -> dict:
        return config_item(name, Configuration.objects.filter(name=name).first())

    @extend_schema(
        summary="Show a configuration key",
        parameters=[OpenApiParameter("key", str, OpenApiParameter.PATH)],
        responses={200: ConfigSerializer, **READ_ERRORS},
    )
    def get(self, request, key: str):
        self._key(key)
        return Response(ConfigSerializer(self._item(key)).data)

    @extend_schema(
        summary="Set a configuration key",
        description='Body `{"value": "8"}`. The value is validated (type and range); a bad '
        "value is a 400 with the reason and changes nothing. A change writes a "
        "`ConfigChanged` event and takes effect at once.",
        parameters=[OpenApiParameter("key", str, OpenApiParameter.PATH)],
        request=ConfigUpdateSerializer,
        responses={200: ConfigSerializer, **WRITE_ERRORS},
    )
    def put(self, request, key: str):
        self._key(key)
        ser = ConfigUpdateSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        try:
            config.set_value(key, ser.validated_data["value"], now=timezone.now(), by=self.by())
        except config.ConfigError as exc:
            return error(str(exc), status.HTTP_400_BAD_REQUEST)
        return Response(ConfigSerializer(self._item(key)).data)


class EngineStatusView(ApiView):
    """The HA engine's liveness: sweeper lease and engine loops (hadash.ha.runtime),
    and the ping ingestion of the web process that answers (hosts.agent.ingest)."""

    @extend_schema(
        summary="Engine status: who sweeps, which engine loops are alive, ping ingestion",
        description="`ingestion` describes the web process that answers this request "
                    "(each web process batches the websocket pings of its own agents): "
                    "pings and batches applied, how many took the steady path, reports "
                    "replaced by a newer one of the same host while queued, reports "
                    "queued now, the age of the oldest waiting ping, and whether it is "
                    "in a backlog (oldest waiting ping older than backlog_after_seconds).",
        responses={200: OpenApiTypes.OBJECT, 401: E401},
    )
    def get(self, request):
        from hadash.ha import runtime
        from hosts.agent import ingest

        return Response({**runtime.status(), "ingestion": ingest.snapshot()})
