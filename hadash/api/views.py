"""The operator REST API (PROTOCOL.md, Operator API): hosts, VMs, HA work, events,
configuration and operator actions.

Reads need any authenticated user (API token or session); writes and actions need a
staff user. Errors are `{"error": "<message>"}` (plus `details` per field for a
rejected body). Operator actions go through `hadash.ha.actions`, which commits each
change with its event; a refused action is 409 (400 when registering a VM).
"""

from __future__ import annotations

import functools
import logging

from django.db import DataError
from django.db.models import BigIntegerField, Count, OuterRef, Subquery, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from drf_spectacular.views import SpectacularJSONAPIView
from rest_framework import exceptions, status
from rest_framework.generics import GenericAPIView
from rest_framework.metadata import BaseMetadata
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import JSONParser
from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import exception_handler as drf_exception_handler

from hadash import config
from hadash.choices import FINAL_STEPS, WorkType
from hadash.ha import actions
from hadash.models import Configuration, Event, HaWork
from hadash.names import NAME_PATTERN, NAME_RULE
from hadash.permissions import is_admin
from hosts.models import Host
from vms.choices import ACTIVE_STATES
from vms.models import VMInstance

from . import filters, guard, pagination
from . import schema as _schema  # noqa: F401  (registers the BearerAuth scheme)
from .serializers import (
    HOST_SETTINGS,
    MAX_ADOPT,
    VM_SETTINGS,
    AdoptSerializer,
    ConfigSerializer,
    ConfigUpdateSerializer,
    ErrorSerializer,
    EventSerializer,
    HaWorkSerializer,
    HostSerializer,
    HostSettingsSerializer,
    UnmanagedVmSerializer,
    VMCreateSerializer,
    VMDefinitionSerializer,
    VMDefinitionUpdateSerializer,
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


def printable(data):
    """``data`` with every lone surrogate written out as ``\\udXXX``: error messages
    may quote what a client sent (DRF's "is not a valid choice"), and a lone surrogate
    cannot be encoded as UTF-8, which made the answer itself a 500 (issue 8)."""
    if isinstance(data, str):
        return data.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(data, dict):
        return {printable(k): printable(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [printable(v) for v in data]
    return data


def api_exception_handler(exc, context):
    """DRF's handler, reshaped to `{"error": "..."}`; unexpected errors are a JSON 500."""
    response = drf_exception_handler(exc, context)
    if response is None and isinstance(exc, DataError):
        # A value the database cannot store that no check caught (the checks should):
        # the client's input, so a 400 — and a warning with the traceback for us.
        log.warning("operator API: the database refused a value", exc_info=exc)
        return Response({"error": "a value in the request cannot be stored (out of range "
                                  "or not storable text)"}, status=400)
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
    response.data = printable(response.data)
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


class EarlyRefusal(exceptions.APIException):
    """A request refused by its headers before its body is read (hadash.api.guard)."""

    def __init__(self, status_code: int, message: str):
        self.status_code = status_code
        super().__init__(message)


def refuse_by_headers(request) -> None:
    """Issue 8: refuse a body by its declared length before reading it
    (hadash.api.guard: 400, 411, 413). Credentials are DRF's to check next, and
    they too are checked before the body is read (401/403)."""
    refusal = guard.length_refusal(guard.meta_headers(request.META),
                                   limit=guard.body_limit(request.path))
    if refusal is not None:
        raise EarlyRefusal(*refusal)


class ApiMetadata(BaseMetadata):
    """OPTIONS: the allowed methods and where the full description is. (DRF's default
    describes the body by fetching the object, which a config key is not: a 500.)"""

    def determine_metadata(self, request, view) -> dict:
        return {
            "name": view.get_view_name(),
            "description": view.get_view_description(),
            "methods": [m for m in view.allowed_methods if m != "HEAD"],
            "openapi": request.build_absolute_uri("/api/v1/openapi.json"),
        }


class JSONAnswers(DefaultContentNegotiation):
    """The answer is JSON whatever the Accept header asks for (not a 406)."""

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


class ApiView(GenericAPIView):
    permission_classes = [StaffWrites]
    # JSON in, JSON out: errors are `{"error": ...}` whatever the client accepts.
    renderer_classes = [JSONRenderer]
    parser_classes = [JSONParser]
    content_negotiation_class = JSONAnswers
    metadata_class = ApiMetadata

    def get_exception_handler(self):
        return api_exception_handler

    def initial(self, request, *args, **kwargs):
        # Before authentication and before the body is read: refused by its headers
        # (hadash.api.guard); then DRF authenticates and checks permissions (401/403),
        # which read no body either — a view reads `request.data` only once the
        # caller is known to be allowed.
        refuse_by_headers(request)
        super().initial(request, *args, **kwargs)

    def params(self, serializer_class) -> dict:
        ser = serializer_class(data=self.request.query_params.dict())
        ser.is_valid(raise_exception=True)
        return ser.validated_data

    def by(self) -> str:
        return self.request.user.get_username()


def _get(queryset, message: str, **lookup):
    if any(isinstance(v, str) and config.text_problem(v) for v in lookup.values()):
        raise exceptions.NotFound(message)  # nothing stored can have that name
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

# Issue 10 item 7: every list is a JSON array with its total and links in headers.
LIST_PAGING = ("The answer is a JSON array; the `X-Total-Count` header says how many rows "
               "match on all pages, and the `Link` header names the next and previous "
               "pages (rel=\"next\", rel=\"prev\"; `offset` moved by `limit`).")


def LIST_OK(serializer_class):  # noqa: N802 (reads like a constant)
    """One page of a list (a plain many=True serializer, so the operation is named
    *_list in the schema)."""
    return serializer_class(many=True)

# Path parameters. Names follow hadash.names (one rule for agents and operators); a
# name outside it is simply not found.
HOST_NAME = OpenApiParameter(
    "name", str, OpenApiParameter.PATH, pattern=rf"^{NAME_PATTERN}$",
    description=f"The host's name ({NAME_RULE}).",
)
VM_NAME = OpenApiParameter(
    "name", str, OpenApiParameter.PATH, pattern=rf"^{NAME_PATTERN}$",
    description=f"The VM's name ({NAME_RULE}).",
)
CONFIG_KEY = OpenApiParameter(
    "key", str, OpenApiParameter.PATH, enum=sorted(config.KEYS),
    description="A configuration key (SPEC §2).",
)
WRITE_ERRORS = {400: E400, 401: E401, 403: E403, 404: E404}


# --- hosts --------------------------------------------------------------------


def hosts_queryset():
    # Per-host subqueries, not a join of every host to its VMs grouped before paging:
    # only the page's hosts are summed, and the COUNT of a page needs no VM (issue 12).
    active = VMInstance.objects.filter(host=OuterRef("pk"), state__in=ACTIVE_STATES) \
        .order_by().values("host")

    def total(agg):
        return Coalesce(Subquery(active.annotate(v=agg).values("v")), 0,
                        output_field=BigIntegerField())

    return Host.objects.annotate(
        allocated_cpus=total(Sum("cpus")),
        allocated_memory_mb=total(Sum("memory_mb")),
        vm_count=total(Count("id")),
    ).order_by("name")


def _host(name: str) -> Host:
    return _get(hosts_queryset(), f"no host named {name!r}", name=name)


class HostListView(ApiView):
    serializer_class = HostSerializer

    @extend_schema(
        summary="List hosts",
        parameters=[filters.HostParams, *pagination.HEADERS],
        description=LIST_PAGING,
        responses={200: LIST_OK(HostSerializer), 400: E400, 401: E401},
    )
    def get(self, request):
        p = self.params(filters.HostParams)
        qs = filters.apply_lookups(hosts_queryset(), p, filters.HostParams.lookups)
        return pagination.paged(request, qs, HostSerializer, offset=p["offset"],
                                limit=p["limit"])


class HostDetailView(ApiView):
    serializer_class = HostSerializer

    @extend_schema(summary="Show a host", parameters=[HOST_NAME],
                   responses={200: HostSerializer, **READ_ERRORS})
    def get(self, request, name: str):
        return Response(HostSerializer(_host(name)).data)

    @extend_schema(
        summary="Change a host's operator-set fields",
        description="Tags and out-of-band management (Redfish BMC) settings; "
        f"settable: {', '.join(HOST_SETTINGS)}. The BMC password is write-only. "
        "Writes a `SettingsChanged` event.",
        parameters=[HOST_NAME],
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

    @extend_schema(parameters=[HOST_NAME], request=None,
                   responses={200: HostSerializer, 409: E409, **WRITE_ERRORS})
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


# --- host re-enrolment (SPEC R29; added by the agent-protocol work, hosts/) ----------


class HostReenrolSerializer(HostSerializer):
    class Meta(HostSerializer.Meta):
        fields = [*HostSerializer.Meta.fields, "reenrol_until"]
        read_only_fields = fields


class HostReenrolView(ApiView):
    """Re-enrol the host (SPEC R29): for one hour, one agent `connect` with the join
    key may take this host — new agent token and server token; its current token works
    until then. For a machine that was reinstalled or lost its token. Admins only;
    writes a `ReEnrolAllowed` event."""

    serializer_class = HostReenrolSerializer

    @extend_schema(summary="Re-enrol a host (one join-key connect within an hour)",
                   parameters=[HOST_NAME], request=None,
                   responses={200: HostReenrolSerializer, **WRITE_ERRORS})
    def post(self, request, name: str):
        host = _host(name)
        host.allow_reenrol(now=timezone.now(), by=self.by())
        return Response(HostReenrolSerializer(_host(name)).data)


# --- VMs ----------------------------------------------------------------------


def vms_queryset():
    return (VMInstance.objects.select_related("host", "last_host", "power_host")
            .prefetch_related("vm_groups").order_by("name"))


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
        parameters=[filters.VMParams, *pagination.HEADERS],
        description=LIST_PAGING,
        responses={200: LIST_OK(VMSerializer), 400: E400, 401: E401},
    )
    def get(self, request):
        p = self.params(filters.VMParams)
        qs = filters.apply_lookups(vms_queryset(), p, filters.VMParams.lookups)
        return pagination.paged(request, qs, VMSerializer, offset=p["offset"],
                                limit=p["limit"])

    @extend_schema(
        summary="Register a VM",
        description="Registers a VM that runs on `host`: state Running, power state PowerOn. "
        "An unknown host or a name already in use is a 400 and nothing is written. "
        "Under `ha.admission` enforce (R23), an HA VM that would push its cluster's "
        "failover capacity below `ha.failover.level` is refused: 409 with the reason.",
        request=VMCreateSerializer,
        responses={201: VMSerializer, 400: E400, 401: E401, 403: E403, 409: E409},
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
        except actions.AdmissionRefused as exc:
            return error(str(exc), status.HTTP_409_CONFLICT)
        except actions.ActionError as exc:
            return error(str(exc), status.HTTP_400_BAD_REQUEST)
        return Response(VMSerializer(_vm(vm.name)).data, status=status.HTTP_201_CREATED)


class VMDetailView(ApiView):
    serializer_class = VMSerializer

    @extend_schema(summary="Show a VM", parameters=[VM_NAME],
                   responses={200: VMSerializer, **READ_ERRORS})
    def get(self, request, name: str):
        return Response(VMSerializer(_vm(name)).data)

    @extend_schema(
        summary="Change a VM's operator-set fields",
        description=f"Settable: {', '.join(VM_SETTINGS)}. Writes a `SettingsChanged` event; "
        "state changes go through the start and stop actions. Under `ha.admission` "
        "enforce (R23), turning `ha_enabled` on for a running VM that would push its "
        "cluster below `ha.failover.level` is refused: 409 with the reason, nothing changes.",
        parameters=[VM_NAME],
        request=VMSettingsSerializer,
        responses={200: VMSerializer, 409: E409, **WRITE_ERRORS},
    )
    def patch(self, request, name: str):
        vm = _vm(name)
        ser = VMSettingsSerializer(data=request.data, partial=True)
        ser.is_valid(raise_exception=True)
        if ser.validated_data.get("ha_enabled") and not vm.ha_enabled:
            from clusters import admission

            try:
                actions.admit(admission.refusal_for_vm(vm, ha_enabled=True,
                                                       cfg=config.snapshot()))
            except actions.AdmissionRefused as exc:
                return error(str(exc), status.HTTP_409_CONFLICT)
        apply_settings(vm, ser.validated_data, by=self.by(), now=timezone.now())
        return Response(VMSerializer(_vm(name)).data)


class VMStopView(ApiView):
    serializer_class = HaWorkSerializer

    @extend_schema(
        summary="Stop a VM",
        description="Operator intent wins (R15a): the VM's unfinished HA item is cancelled, "
        "then a Stop work item (reason Operator) is queued and the VM stops when an HA "
        "worker runs it — answered 202 with the work item. A VM that is already Stopped "
        "needs no stop: answered 200 with the VM (nothing else changes).",
        parameters=[VM_NAME],
        request=None,
        responses={202: HaWorkSerializer, 200: VMSerializer, 409: E409, **WRITE_ERRORS},
    )
    def post(self, request, name: str):
        vm = _vm(name)
        try:
            work = actions.stop_vm(vm, now=timezone.now(), by=self.by())
        except actions.ActionError as exc:
            return error(str(exc), status.HTTP_409_CONFLICT)
        if work is None or work.type != WorkType.STOP:
            return Response(VMSerializer(_vm(vm.name)).data)
        work = HaWork.objects.select_related("instance", "host", "target_host").get(pk=work.pk)
        return Response(HaWorkSerializer(work).data, status=status.HTTP_202_ACCEPTED)


class VMStartView(ApiView):
    serializer_class = VMSerializer

    @extend_schema(
        summary="Start a VM",
        description="Places and starts a stopped VM now (synchronously); answers with the VM. "
        "409 with the reason when no host has room, or (R23, `ha.admission` enforce) when "
        "an HA VM would push its cluster below `ha.failover.level`.",
        parameters=[VM_NAME],
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


class VMDefinitionView(ApiView):
    """A VM's definition (PROTOCOL.md v1.1, issue 9): the latest its host's agent
    reported, or an operator set; `start` sends it so another host can run the VM."""

    serializer_class = VMDefinitionSerializer

    def _with_xml(self, name: str) -> VMInstance:
        vm = _get(VMInstance.objects.select_related("definition_host"),
                  f"no VM named {name!r}", name=name)
        vm.definition_xml  # noqa: B018 - loaded here (the manager defers it)
        return vm

    @extend_schema(summary="Show a VM's definition", parameters=[VM_NAME],
                   responses={200: VMDefinitionSerializer, **READ_ERRORS})
    def get(self, request, name: str):
        vm = self._with_xml(name)
        if not vm.definition_format:
            return error(f"VM {name} has no definition yet (its agent has not sent one)",
                         status.HTTP_404_NOT_FOUND)
        return Response(VMDefinitionSerializer(vm).data)

    @extend_schema(
        summary="Set a VM's definition",
        description="Replaces the stored definition (`{\"format\": \"libvirt-xml\", "
        "\"xml\": …}`, at most 1 MiB of XML). Admins only; writes a `DefinitionChanged` "
        "event. The VM's host's agent replaces it again when its own definition changes.",
        parameters=[VM_NAME],
        request=VMDefinitionUpdateSerializer,
        responses={200: VMDefinitionSerializer, **WRITE_ERRORS},
    )
    def put(self, request, name: str):
        from vms import definitions

        vm = _vm(name)
        ser = VMDefinitionUpdateSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        d = ser.validated_data
        definitions.set_by_operator(vm, d["format"], d["xml"], by=self.by(), now=timezone.now())
        return Response(VMDefinitionSerializer(self._with_xml(name)).data)


# --- unmanaged VMs (issue 9 part 2) -------------------------------------------


class UnmanagedVmListView(ApiView):
    """VMs hosts report that hadash does not manage (PROTOCOL.md v1.1): seen lately,
    not registered. Nothing is adopted automatically."""

    serializer_class = UnmanagedVmSerializer

    @extend_schema(summary="List unmanaged VMs",
                   parameters=[filters.UnmanagedParams, *pagination.HEADERS],
                   description=LIST_PAGING,
                   responses={200: LIST_OK(UnmanagedVmSerializer), 400: E400, 401: E401})
    def get(self, request):
        from vms import discovery

        p = self.params(filters.UnmanagedParams)
        return pagination.paged(request, discovery.listed(now=timezone.now()),
                                UnmanagedVmSerializer, offset=p["offset"], limit=p["limit"])


class UnmanagedVmAdoptView(ApiView):
    serializer_class = AdoptSerializer

    @extend_schema(
        summary="Adopt unmanaged VMs",
        description="`{\"vms\": [ ... ]}`, one entry or many (at most "
        f"{MAX_ADOPT}). Registers each listed VM Running on the host that reports it "
        "(Stopped, last on that host, if it is powered off there), with HA on or off and a "
        "priority, and the definition that host sent; cpus and memory_mb come from the "
        "definition when it says, else from the entry. All or nothing, in one "
        "transaction: the list is validated as a whole and any entry that cannot be "
        "adopted refuses the request with a 400 whose `errors` lists every bad entry "
        "(index, name, reason); under `ha.admission` enforce (R23) the request is judged "
        "as a whole (409 with the reason). Nothing is written then. Admins only.",
        request=AdoptSerializer,
        responses={201: VMSerializer(many=True), 400: E400, 401: E401, 403: E403,
                   409: E409},
    )
    def post(self, request):
        from . import bulk

        try:
            ids = bulk.adopt(request.data, now=timezone.now(), by=self.by())
        except bulk.Refused as exc:
            return exc.response()
        rows = vms_queryset().filter(pk__in=ids)
        return Response(VMSerializer(rows, many=True).data, status=status.HTTP_201_CREATED)


# --- HA work ------------------------------------------------------------------


def work_queryset():
    return HaWork.objects.select_related("instance", "host", "target_host").order_by("-id")


class HaWorkListView(ApiView):
    serializer_class = HaWorkSerializer

    @extend_schema(
        summary="List HA work items, newest first",
        parameters=[filters.HaWorkParams, *pagination.HEADERS],
        description=LIST_PAGING,
        responses={200: LIST_OK(HaWorkSerializer), 400: E400, 401: E401},
    )
    def get(self, request):
        p = self.params(filters.HaWorkParams)
        qs = filters.apply_lookups(work_queryset(), p, filters.HaWorkParams.lookups)
        if "finished" in p:
            qs = qs.filter(step__in=FINAL_STEPS) if p["finished"] else qs.unfinished()
        return pagination.paged(request, qs, HaWorkSerializer, offset=p["offset"],
                                limit=p["limit"])


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
        summary="List events, newest first",
        description="Events, **newest first** by default: `events?limit=5` is the five "
        "newest. With `after`, only events with a greater id, **oldest first** (to follow "
        "the feed, ask again with `after` set to the last id seen); `order` chooses "
        "either way explicitly. `latest=true`: the newest `limit` events, listed oldest "
        "first. " + LIST_PAGING,
        parameters=[filters.EventParams, *pagination.HEADERS],
        responses={200: LIST_OK(EventSerializer), 400: E400, 401: E401},
    )
    def get(self, request):
        p = self.params(filters.EventParams)
        qs = Event.objects.all()
        if "after" in p:
            qs = qs.filter(id__gt=p["after"])
        qs = filters.apply_lookups(qs, p, filters.EventParams.lookups)
        if "acknowledged" in p:
            qs = qs.filter(acknowledged_at__isnull=not p["acknowledged"])
        if p["latest"]:
            return pagination.paged(request, qs.order_by("-id"), EventSerializer,
                                    offset=p["offset"], limit=p["limit"],
                                    transform=lambda rows: rows[::-1])
        order = p.get("order") or (filters.OLDEST if "after" in p else filters.NEWEST)
        qs = qs.order_by("id" if order == filters.OLDEST else "-id")
        return pagination.paged(request, qs, EventSerializer, offset=p["offset"],
                                limit=p["limit"])


class EventDetailView(ApiView):
    serializer_class = EventSerializer

    @extend_schema(summary="Show an event", responses={200: EventSerializer, **READ_ERRORS})
    def get(self, request, pk: int):
        return Response(EventSerializer(_get(Event.objects, f"no event {pk}", pk=pk)).data)


class EventAcknowledgeView(ApiView):
    serializer_class = EventSerializer

    @extend_schema(
        summary="Acknowledge an alert event (deprecated: POST /alerts/{id}/acknowledge)",
        description="Kept for one release. Marks the event acknowledged (by the calling "
        "user) and acknowledges the alert it belongs to (R19: its incident's alert, or the "
        "alert an AlertOpened event opened). Acknowledging again changes nothing; an event "
        "that is not an alert and belongs to no alert is a 400.",
        request=None,
        responses={200: EventSerializer, **WRITE_ERRORS},
    )
    def post(self, request, pk: int):
        from .incidents import acknowledge_for_event, alert_for_event

        event = _get(Event.objects, f"no event {pk}", pk=pk)
        if not event.alert and alert_for_event(event) is None:
            return error(f"event {pk} is not an alert and belongs to no alert",
                         status.HTTP_400_BAD_REQUEST)
        now = timezone.now()
        acknowledge_for_event(event, by=self.by(), now=now)
        Event.objects.filter(pk=pk, acknowledged_at__isnull=True).update(
            acknowledged_at=now, acknowledged_by=self.by()
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
        description="Every key on one page (X-Total-Count says how many).",
        parameters=pagination.HEADERS,
        responses={200: LIST_OK(ConfigSerializer), 401: E401},
    )
    def get(self, request):
        rows = {r.name: r for r in Configuration.objects.all()}
        items = [config_item(name, rows.get(name)) for name in sorted(config.KEYS)]
        return pagination.with_headers(Response(ConfigSerializer(items, many=True).data),
                                       request, offset=0, limit=len(items),
                                       shown=len(items), total=len(items))


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
        parameters=[CONFIG_KEY],
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
        parameters=[CONFIG_KEY],
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


# --- index, documentation, unknown paths --------------------------------------


class OpenApiDocumentView(SpectacularJSONAPIView):
    """`/api/v1/openapi.json`: answered whatever the Accept header says, and errors
    (a POST: 405) in the API's `{"error": ...}` shape."""

    content_negotiation_class = JSONAnswers

    def get_exception_handler(self):
        return api_exception_handler


# Plain Django views (outside the OpenAPI document): they read no body and show
# nothing that /api/v1/openapi.json does not already publish.

RESOURCES = {
    "hosts": ("host-list", "Hosts: list, show, change settings (one, or many with POST "
              "/hosts/bulk); enable, disable, maintenance, cancel-maintenance."),
    "vms": ("vm-list", "VMs: list, register (one, or many with POST /vms/bulk), show, "
            "change settings; start, stop; definition (show, set)."),
    "unmanaged-vms": ("unmanaged-vm-list", "VMs hosts report that hadash does not manage; "
                      "adopt them (one or many)."),
    "ha-work": ("ha-work-list", "HA work items (op_ha_work), newest first."),
    "events": ("event-list", "Events, oldest first."),
    "incidents": ("incident-list", "Incidents (R18), newest first: VMs with downtime, "
                  "timeline, HA items, alert."),
    "alerts": ("alert-list", "Alerts (R19), newest first; acknowledge them."),
    "notification-channels": ("notification-channel-list", "Notification channels (R20): "
                              "list, create, change, delete; send test."),
    "deliveries": ("delivery-list", "Notification deliveries (R20), newest first: state, "
                   "attempts, last error."),
    "clusters": ("cluster-list", "Clusters with their failover capacity (R22); each "
                 "cluster's failover plan and what-if."),
    "vm-groups": ("vm-group-list", "VM groups (R25): anti-affinity and affinity; list, "
                  "create, change, delete."),
    "ha-mode": ("ha-mode", "HA mode (R26): armed, observe or disarmed, for the installation; "
                "PUT /clusters/{name}/ha-mode for one cluster."),
    "config": ("config-list", "Configuration keys (SPEC §2): list, show, set."),
    "engine": ("engine-status", "Engine status: sweeper, engine loops, ping ingestion."),
}


@csrf_exempt
def api_index(request):
    """`GET /api/v1/`: what is here and where it is described."""
    from django.http import JsonResponse
    from django.urls import reverse

    def url(name: str) -> str:
        return request.build_absolute_uri(reverse(name))

    return JsonResponse({
        "name": "hadash operator API",
        "version": "v1",
        "authentication": "Authorization: Bearer <api token> (made with "
                          "`python manage.py apitoken USERNAME`), or a logged-in session",
        "resources": {
            name: {"url": url(view), "description": text}
            for name, (view, text) in RESOURCES.items()
        },
        "openapi": url("openapi"),
        "docs": url("api-docs"),
    })


@functools.cache
def _openapi_document() -> dict:
    import json

    from drf_spectacular.generators import SchemaGenerator

    from .urls import schema_patterns

    doc = SchemaGenerator(patterns=schema_patterns).get_schema(request=None, public=True)
    return json.loads(json.dumps(doc, default=str))


@csrf_exempt
def api_docs(request):
    """`GET /api/v1/docs`: the OpenAPI document as one plain HTML page (no scripts, no
    third-party assets): every operation with its parameters and answers."""
    from django.http import HttpResponse
    from django.utils.html import format_html, format_html_join

    doc = _openapi_document()
    rows = []
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            params = format_html_join(
                ", ", "<code>{}</code> ({})",
                ((p["name"], p.get("in", "")) for p in op.get("parameters", [])),
            )
            answers = ", ".join(sorted(op.get("responses", {})))
            rows.append(format_html(
                "<tr><td><code>{} {}</code></td><td>{}<br><small>{}</small></td>"
                "<td>{}</td><td>{}</td></tr>",
                method.upper(), path, op.get("summary", ""), op.get("description", ""),
                params, answers,
            ))
    page = format_html(
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<title>{title}</title></head><body><h1>{title} {version}</h1><p>{desc}</p>"
        "<p>Authentication: <code>Authorization: Bearer &lt;api token&gt;</code>. "
        "Errors are <code>{{\"error\": \"…\"}}</code>. Machine-readable: "
        "<a href='{openapi}'>openapi.json</a>.</p>"
        "<table border='1' cellpadding='4'><tr><th>call</th><th>what</th>"
        "<th>parameters</th><th>answers</th></tr>{rows}</table></body></html>",
        title=doc["info"]["title"], version=doc["info"]["version"],
        desc=doc["info"].get("description", ""), openapi="openapi.json",
        rows=format_html_join("", "{}", ((r,) for r in rows)),
    )
    return HttpResponse(page)


@csrf_exempt
def api_not_found(request, rest: str = ""):
    """Any other path under /api/v1/: a JSON 404, whatever the method (no body read)."""
    from django.http import JsonResponse

    message = f"no such API path: {request.path}"
    if request.path.endswith("/") and request.path != "/api/v1/":
        message += f" (API paths have no trailing slash: try {request.path.rstrip('/')})"
    return JsonResponse({"error": f"{message}; the index of the API is /api/v1/"},
                        status=404)
