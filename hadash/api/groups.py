"""Operator API for VM groups (R25), mounted under /api/v1/ (hadash.api.urls):

    GET    /vm-groups              every group (JSON array, paged like every list)
    POST   /vm-groups              {"name", "kind", "vms": [...], "cluster"?}   admins
    GET    /vm-groups/{name}
    PATCH  /vm-groups/{name}       any of kind, vms (the whole list), cluster     admins
    DELETE /vm-groups/{name}                                                      admins

`kind` is `anti-affinity` (strict: never two members on one host — HA restarts,
maintenance migrations, starts and the failover plan honour it) or `affinity` (soft:
a member's host is preferred). Each change is committed with its event. A bad body
is a 400 naming the problem, and nothing changes. Members that already share a host
against an anti-affinity group are named in `conflicts` (nothing is moved).
"""

from __future__ import annotations

from django.urls import path
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response

from vms import groups
from vms.choices import GroupKind
from vms.models import VmGroup

from . import pagination
from .filters import ListParams
from .views import E400, E401, E403, READ_ERRORS, WRITE_ERRORS, ApiView, _get, error


class VmGroupSerializer(serializers.ModelSerializer):
    vms = serializers.SerializerMethodField(help_text="Member VM names.")
    conflicts = serializers.SerializerMethodField(
        help_text="Hosts where members of an anti-affinity group run together now "
                  "(from before the group said so): \"kvm-03: db1, db2\".")

    class Meta:
        model = VmGroup
        fields = ["name", "kind", "vms", "cluster", "conflicts", "id", "created"]
        read_only_fields = fields

    def get_vms(self, obj) -> list[str]:
        return sorted(v.name for v in obj.members.all())

    def get_conflicts(self, obj) -> list[str]:
        return groups.conflicts(obj)


class VmGroupWriteSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=255, required=False)
    kind = serializers.ChoiceField(choices=GroupKind.choices, required=False)
    vms = serializers.ListField(child=serializers.CharField(max_length=255),
                                max_length=groups.MAX_MEMBERS, required=False)
    cluster = serializers.CharField(max_length=255, required=False, allow_blank=True)

    def validate(self, attrs):
        unknown = sorted(set(self.initial_data) - set(self.fields))
        if unknown:
            raise serializers.ValidationError(
                f"unknown field(s) {', '.join(unknown)}; a VM group is "
                "{\"name\", \"kind\", \"vms\", \"cluster\"}")
        return attrs


def _group(name: str) -> VmGroup:
    return _get(VmGroup.objects.prefetch_related("members"), f"no VM group named {name!r}",
                name=name)


def _answer(group: VmGroup, code=status.HTTP_200_OK) -> Response:
    return Response(VmGroupSerializer(_group(group.name)).data, status=code)


class VmGroupListView(ApiView):
    serializer_class = VmGroupSerializer

    @extend_schema(summary="List VM groups (R25)",
                   parameters=[ListParams, *pagination.HEADERS],
                   responses={200: VmGroupSerializer(many=True), 400: E400, 401: E401})
    def get(self, request):
        p = self.params(ListParams)
        qs = VmGroup.objects.prefetch_related("members").order_by("name")
        return pagination.paged(request, qs, VmGroupSerializer, offset=p["offset"],
                                limit=p["limit"])

    @extend_schema(summary="Create a VM group (R25)", request=VmGroupWriteSerializer,
                   responses={201: VmGroupSerializer, 400: E400, 401: E401, 403: E403})
    def post(self, request):
        ser = VmGroupWriteSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        d = ser.validated_data
        missing = [f for f in ("name", "kind") if f not in d]
        if missing:
            return error(f"{' and '.join(missing)} required", status.HTTP_400_BAD_REQUEST)
        try:
            group = groups.create(name=d["name"], kind=d["kind"], vms=d.get("vms", []),
                                  cluster=d.get("cluster", ""), now=timezone.now(),
                                  by=self.by())
        except groups.GroupError as exc:
            return error(str(exc), status.HTTP_400_BAD_REQUEST)
        return _answer(group, status.HTTP_201_CREATED)


class VmGroupDetailView(ApiView):
    serializer_class = VmGroupSerializer

    @extend_schema(summary="Show a VM group", responses={200: VmGroupSerializer,
                                                         **READ_ERRORS})
    def get(self, request, name: str):
        return Response(VmGroupSerializer(_group(name)).data)

    @extend_schema(summary="Change a VM group: kind, members (the whole list), cluster",
                   request=VmGroupWriteSerializer,
                   responses={200: VmGroupSerializer, **WRITE_ERRORS})
    def patch(self, request, name: str):
        group = _group(name)
        ser = VmGroupWriteSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        d = ser.validated_data
        if "name" in d and d["name"] != group.name:
            return error("a group's name cannot change; create another",
                         status.HTTP_400_BAD_REQUEST)
        try:
            groups.update(group, kind=d.get("kind"), vms=d.get("vms"),
                          cluster=d.get("cluster"), now=timezone.now(), by=self.by())
        except groups.GroupError as exc:
            return error(str(exc), status.HTTP_400_BAD_REQUEST)
        return _answer(group)

    @extend_schema(summary="Delete a VM group", request=None,
                   responses={204: None, **WRITE_ERRORS})
    def delete(self, request, name: str):
        groups.delete(_group(name), now=timezone.now(), by=self.by())
        return Response(status=status.HTTP_204_NO_CONTENT)


urlpatterns = [
    path("vm-groups", VmGroupListView.as_view(), name="vm-group-list"),
    path("vm-groups/<str:name>", VmGroupDetailView.as_view(), name="vm-group-detail"),
]
