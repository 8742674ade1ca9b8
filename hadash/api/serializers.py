"""Operator API shapes (PROTOCOL.md, Operator API). Host, VM and HA work fields keep
CloudStack's names; related hosts and VMs are given by name."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from hadash.choices import Subject
from hadash.config import tag_problem
from hadash.events import record_event
from hadash.models import Event, HaWork
from hadash.names import validate_name
from hosts import hastatus as host_hastatus
from hosts.models import Host
from vms import hastatus as vm_hastatus
from vms.choices import ACTIVE_STATES, Priority, VmType
from vms.models import VMInstance


class ErrorSerializer(serializers.Serializer):
    """Every error answer: `{"error": "<human-readable message>"}`."""

    error = serializers.CharField()
    details = serializers.JSONField(
        required=False, help_text="For a rejected body or query: the messages per field."
    )


# --- hosts --------------------------------------------------------------------


@extend_schema_field(
    {
        "type": "array",
        "items": {"type": "string"},
        "description": "Host tags (also accepted as one comma-separated string).",
    }
)
class TagsField(serializers.Field):
    """Host tags: stored comma-separated (CloudStack), shown as a list."""

    default_error_messages = {
        "invalid": "Expected a list of tags or a comma-separated string.",
        "too_long": "Tags are too long (at most 1024 characters in all).",
    }

    def to_representation(self, value: str) -> list[str]:
        return [t.strip() for t in (value or "").split(",") if t.strip()]

    def to_internal_value(self, data: Any) -> str:
        if isinstance(data, str):
            items = data.split(",")
        elif isinstance(data, list) and all(isinstance(i, str) for i in data):
            items = data
        else:
            self.fail("invalid")
        tags: list[str] = []
        for item in items:
            if "," in item:
                tags.extend(t.strip() for t in item.split(",") if t.strip())
            elif item.strip():
                tags.append(item.strip())
        for number, tag in enumerate(tags, 1):
            problem = tag_problem(tag)
            if problem:
                # The message names the tag by position: it may not be printable.
                raise serializers.ValidationError(f"tag {number}: {problem}", code="invalid")
        joined = ",".join(dict.fromkeys(tags))
        if len(joined) > 1024:
            self.fail("too_long")
        return joined


# --- HA status (R17) ------------------------------------------------------------

HA_STATUS_SCHEMA = {
    "type": "object",
    "description": "R17: what HA thinks of it. `code` (VM: protected, at-risk, unprotected, "
    "recovering, waiting, failed, stopped; host: up, suspect, investigating, alert, down, "
    "maintenance, prepare-for-maintenance, error-in-maintenance, disabled, disconnected, "
    "connecting), `reason` (one line an operator can act on), `since` and `next_try` "
    "(ISO 8601 or null), and for a waiting VM `cause` (no-capacity, braked, backoff, "
    "fencing-failed, host-unreachable, order, anti-affinity, disarmed, observed).",
    "properties": {
        "code": {"type": "string"},
        "reason": {"type": "string"},
        "since": {"type": "string", "format": "date-time", "nullable": True},
        "next_try": {"type": "string", "format": "date-time", "nullable": True},
        "cause": {"type": "string"},
    },
    "required": ["code", "reason", "since", "next_try"],
}


class HaStatusListSerializer(serializers.ListSerializer):
    """A list of hosts or VMs: their HA statuses are computed for the whole page at
    once, in a fixed number of queries (hosts.hastatus / vms.hastatus)."""

    def to_representation(self, data):
        rows = list(data.all() if hasattr(data, "all") else data)
        self.child._ha_statuses = self.child.ha_statuses(rows)
        try:
            return [self.child.to_representation(row) for row in rows]
        finally:
            self.child._ha_statuses = None


class HaStatusMixin:
    _ha_statuses: dict | None = None

    @staticmethod
    def ha_statuses(rows) -> dict:  # pragma: no cover - overridden
        raise NotImplementedError

    @extend_schema_field(HA_STATUS_SCHEMA)
    def get_ha_status(self, obj) -> dict:
        statuses = self._ha_statuses
        if statuses is None or obj.pk not in statuses:
            statuses = self.ha_statuses([obj])
        return statuses[obj.pk].as_dict()


class HostSerializer(HaStatusMixin, serializers.ModelSerializer):
    hypervisor = serializers.CharField(source="hypervisor_type", read_only=True)
    address = serializers.CharField(source="private_ip_address", read_only=True)
    tags = TagsField(read_only=True)
    allocated_cpus = serializers.SerializerMethodField(
        help_text="CPUs of the VMs that occupy capacity on this host (SPEC R13)."
    )
    allocated_memory_mb = serializers.SerializerMethodField(
        help_text="Memory (MB) of the VMs that occupy capacity on this host."
    )
    vm_count = serializers.SerializerMethodField(
        help_text="VMs that occupy capacity on this host."
    )
    oobm_password_set = serializers.SerializerMethodField(
        help_text="Whether a BMC password is stored (the password itself is never shown)."
    )
    agent_kind = serializers.CharField(
        read_only=True,
        help_text='Who serves the host (issue 9): "agent" (hadash-agent), "simulator" '
        '(the fleet simulator), "other", or "" (its connect sent no `agent` block).',
    )
    ha_status = serializers.SerializerMethodField()

    @staticmethod
    def ha_statuses(rows) -> dict:
        return host_hastatus.statuses_for(rows, now=timezone.now())

    class Meta:
        model = Host
        fields = [
            "name", "status", "resource_state", "cluster", "last_ping", "cpus", "memory_mb",
            "id", "uuid", "type", "hypervisor", "tags", "address", "agent_url",
            "allocated_cpus", "allocated_memory_mb", "vm_count",
            "oobm_enabled", "oobm_address", "oobm_system_id", "oobm_username",
            "oobm_password_set", "next_investigation", "created",
            "agent_kind", "agent_name", "agent_version", "agent_hypervisor_uri",
            "ha_status",
        ]
        read_only_fields = fields
        list_serializer_class = HaStatusListSerializer

    def _allocation(self, obj: Host) -> dict[str, int]:
        if hasattr(obj, "allocated_cpus"):
            return {
                "cpus": obj.allocated_cpus or 0,
                "memory_mb": obj.allocated_memory_mb or 0,
                "count": obj.vm_count or 0,
            }
        cache = getattr(obj, "_allocation_cache", None)
        if cache is None:
            rows = list(
                VMInstance.objects.filter(host=obj, state__in=ACTIVE_STATES).values_list(
                    "cpus", "memory_mb"
                )
            )
            cache = {
                "cpus": sum(r[0] for r in rows),
                "memory_mb": sum(r[1] for r in rows),
                "count": len(rows),
            }
            obj._allocation_cache = cache
        return cache

    @extend_schema_field(OpenApiTypes.INT)
    def get_allocated_cpus(self, obj: Host) -> int:
        return self._allocation(obj)["cpus"]

    @extend_schema_field(OpenApiTypes.INT)
    def get_allocated_memory_mb(self, obj: Host) -> int:
        return self._allocation(obj)["memory_mb"]

    @extend_schema_field(OpenApiTypes.INT)
    def get_vm_count(self, obj: Host) -> int:
        return self._allocation(obj)["count"]

    @extend_schema_field(OpenApiTypes.BOOL)
    def get_oobm_password_set(self, obj: Host) -> bool:
        return bool(obj.oobm_password)


def _field_name(name: str) -> str:
    """An unknown field name from a request body, safe to repeat in a message."""
    return name if name.isidentifier() and len(name) <= 64 else repr(name[:64])


HOST_SETTINGS = ("tags", "oobm_enabled", "oobm_address", "oobm_system_id", "oobm_username",
                 "oobm_password")


class HostSettingsSerializer(serializers.Serializer):
    """The operator-set fields of a host (`PATCH /api/v1/hosts/{name}`). Everything
    else about a host comes from its agent and the HA engine."""

    tags = TagsField(required=False)
    oobm_enabled = serializers.BooleanField(required=False)
    oobm_address = serializers.URLField(
        required=False, allow_blank=True, max_length=1024,
        help_text="Redfish service root of the host's BMC, e.g. https://10.0.1.11",
    )
    oobm_system_id = serializers.CharField(required=False, allow_blank=True, max_length=255)
    oobm_username = serializers.CharField(required=False, allow_blank=True, max_length=255)
    oobm_password = serializers.CharField(
        required=False, allow_blank=True, max_length=255, write_only=True, trim_whitespace=False,
        style={"input_type": "password"},
    )

    def validate(self, attrs):
        unknown = sorted(set(self.initial_data) - set(self.fields))
        if unknown:
            raise serializers.ValidationError(
                f"cannot set {', '.join(map(_field_name, unknown))}; settable host fields: "
                f"{', '.join(HOST_SETTINGS)}"
            )
        host: Host | None = self.instance
        merged = {f: attrs.get(f, getattr(host, f, "")) for f in HOST_SETTINGS}
        if merged["oobm_enabled"] and not (merged["oobm_address"] and merged["oobm_system_id"]):
            raise serializers.ValidationError(
                "out-of-band management needs oobm_address and oobm_system_id to be enabled"
            )
        return attrs


# --- VMs ----------------------------------------------------------------------


class VMSerializer(HaStatusMixin, serializers.ModelSerializer):
    host = serializers.SlugRelatedField(slug_field="name", read_only=True, allow_null=True)
    last_host = serializers.SlugRelatedField(slug_field="name", read_only=True, allow_null=True)
    power_host = serializers.SlugRelatedField(slug_field="name", read_only=True, allow_null=True)
    has_definition = serializers.BooleanField(
        read_only=True,
        help_text="Whether a definition is stored (GET /api/v1/vms/{name}/definition).",
    )
    ha_status = serializers.SerializerMethodField()
    groups = serializers.SlugRelatedField(
        source="vm_groups", slug_field="name", many=True, read_only=True,
        help_text="The VM groups it belongs to (R25; /api/v1/vm-groups).")

    @staticmethod
    def ha_statuses(rows) -> dict:
        return vm_hastatus.statuses_for(rows, now=timezone.now())

    class Meta:
        model = VMInstance
        fields = [
            "name", "state", "power_state", "host", "last_host", "ha_enabled", "priority",
            "cpus", "memory_mb",
            "id", "uuid", "type", "power_host", "power_state_update_time",
            "power_state_update_count", "update_count", "created", "has_definition",
            "ha_status", "groups",
        ]
        read_only_fields = fields
        list_serializer_class = HaStatusListSerializer


class VMDefinitionSerializer(serializers.Serializer):
    """A VM's stored definition (PROTOCOL.md v1.1, issue 9): sent with `start` so
    another host can run the VM."""

    name = serializers.CharField(read_only=True)
    format = serializers.CharField(source="definition_format", read_only=True)
    xml = serializers.CharField(source="definition_xml", read_only=True)
    updated = serializers.DateTimeField(source="definition_time", read_only=True,
                                        allow_null=True)
    host = serializers.CharField(
        source="definition_host.name", read_only=True, allow_null=True,
        help_text="The host whose agent reported it (null: set by an operator).")
    by = serializers.CharField(source="definition_by", read_only=True,
                               help_text="The operator who set it (empty: its agent).")


class VMDefinitionUpdateSerializer(serializers.Serializer):
    """`PUT /api/v1/vms/{name}/definition`: the whole definition."""

    format = serializers.ChoiceField(choices=[("libvirt-xml", "libvirt-xml")])
    xml = serializers.CharField(trim_whitespace=False, help_text=(
        "libvirt domain XML, at most 1 MiB in UTF-8; no NUL or control characters "
        "other than tab, newline and carriage return."))

    def validate(self, attrs):
        from vms import definitions

        unknown = sorted(set(self.initial_data) - set(self.fields))
        if unknown:
            raise serializers.ValidationError(
                f"unknown field(s) {', '.join(map(_field_name, unknown))}; a definition "
                "is {\"format\": \"libvirt-xml\", \"xml\": …}")
        try:
            fmt, xml = definitions.clean(attrs)
        except definitions.DefinitionError as exc:
            raise serializers.ValidationError(f"definition {exc}") from None
        return {"format": fmt, "xml": xml}


# A pattern, not an enum, in the schema: an enum here would be a second component for
# the choices of VMSerializer.type (drf-spectacular's naming collision).
@extend_schema_field({
    "type": "string",
    "pattern": "^(" + "|".join(VmType.values) + ")$",
    "default": VmType.USER,
    "description": "One of " + ", ".join(VmType.values) + " (default User).",
})
class VmTypeField(serializers.CharField):
    pass


# Limits of a VM's size: the vm_instance columns hold cpus up to 2^31 - 1; memory_mb
# stays far below the column's 2^63 - 1 so that a host's total (the sum over its VMs)
# can never overflow (4 EiB per VM, a million such VMs on one host).
MAX_VM_CPUS = 2_147_483_647
MAX_VM_MEMORY_MB = 2**42


class VMCreateSerializer(serializers.Serializer):
    """Registers a VM that runs on ``host`` (state Running, power PowerOn)."""

    name = serializers.CharField(
        max_length=255, validators=[validate_name],
        help_text="The VM's name: 1 to 255 characters, ASCII letters, digits, '.', '_' and "
        "'-', starting with a letter or digit (hadash.names).",
    )
    host = serializers.CharField(
        max_length=255, validators=[validate_name],
        help_text="Name of the host the VM runs on.",
    )
    cpus = serializers.IntegerField(min_value=1, max_value=MAX_VM_CPUS)
    memory_mb = serializers.IntegerField(min_value=1, max_value=MAX_VM_MEMORY_MB)
    ha_enabled = serializers.BooleanField(default=False)
    priority = serializers.ChoiceField(choices=Priority.choices, default=Priority.MEDIUM)
    type = VmTypeField(
        default=VmType.USER,
        help_text="One of " + ", ".join(VmType.values) + " (default User).",
    )

    def validate_type(self, value: str) -> str:
        if value not in VmType.values:
            raise serializers.ValidationError(
                f"{value!r} is not a VM type; choose from {', '.join(VmType.values)}"
            )
        return value


VM_SETTINGS = ("ha_enabled", "priority")


class VMSettingsSerializer(serializers.Serializer):
    """The operator-set fields of a VM (`PATCH /api/v1/vms/{name}`)."""

    ha_enabled = serializers.BooleanField(required=False)
    priority = serializers.ChoiceField(choices=Priority.choices, required=False)

    def validate(self, attrs):
        unknown = sorted(set(self.initial_data) - set(self.fields))
        if unknown:
            raise serializers.ValidationError(
                f"cannot set {', '.join(map(_field_name, unknown))}; settable VM fields: "
                f"{', '.join(VM_SETTINGS)} (state changes go through the start/stop actions)"
            )
        return attrs


# --- unmanaged VMs (issue 9 part 2) ----------------------------------------------


class UnmanagedVmSerializer(serializers.Serializer):
    """A VM a host's agent reports that hadash does not manage."""

    name = serializers.CharField(read_only=True)
    host = serializers.CharField(source="host.name", read_only=True)
    power_state = serializers.CharField(read_only=True)
    has_definition = serializers.BooleanField(read_only=True)
    first_seen = serializers.DateTimeField(read_only=True)
    last_seen = serializers.DateTimeField(read_only=True)


# One request adopts (or registers, POST /api/v1/vms/bulk) at most this many VMs.
MAX_ADOPT = 20_000
MAX_BULK = 20_000


class AdoptEntrySerializer(serializers.Serializer):
    name = serializers.CharField(max_length=255, validators=[validate_name])
    host = serializers.CharField(max_length=255, validators=[validate_name],
                                 help_text="The host that reports it.")
    ha_enabled = serializers.BooleanField(default=False)
    priority = serializers.ChoiceField(choices=Priority.choices, default=Priority.MEDIUM)
    cpus = serializers.IntegerField(
        min_value=1, max_value=MAX_VM_CPUS, required=False,
        help_text="Used when its definition does not say (required then).")
    memory_mb = serializers.IntegerField(
        min_value=1, max_value=MAX_VM_MEMORY_MB, required=False,
        help_text="Used when its definition does not say (required then).")


class AdoptSerializer(serializers.Serializer):
    """`POST /api/v1/unmanaged-vms/adopt`: all entries are adopted or none."""

    vms = AdoptEntrySerializer(many=True, allow_empty=False, max_length=MAX_ADOPT)


class VMBulkCreateSerializer(serializers.Serializer):
    """`POST /api/v1/vms/bulk`: register many VMs at once, all or none (the OpenAPI
    shape; hadash.api.bulk validates the list as a whole)."""

    vms = VMCreateSerializer(
        many=True, allow_empty=False, max_length=MAX_BULK,
        help_text=f"The VMs to register, each as for POST /api/v1/vms (at most {MAX_BULK}).",
    )


class VMBulkResultSerializer(serializers.Serializer):
    count = serializers.IntegerField(help_text="How many VMs were registered.")
    names = serializers.ListField(child=serializers.CharField(),
                                  help_text="Their names, in the order of the request.")


class BulkItemErrorSerializer(serializers.Serializer):
    index = serializers.IntegerField(
        help_text="Position of the item in the list (`vms`, `hosts`), from 0.")
    name = serializers.CharField(allow_null=True, help_text="The item's name, if it has one.")
    error = serializers.CharField()


class BulkErrorSerializer(ErrorSerializer):
    """A refused bulk request: `error` sums it up, `errors` lists every bad item."""

    errors = BulkItemErrorSerializer(many=True, required=False)


MAX_HOST_BULK = 20_000


class HostBulkItemSerializer(HostSettingsSerializer):
    """One host of `POST /api/v1/hosts/bulk`: its name and the fields to set, as for
    `PATCH /api/v1/hosts/{name}` (the OpenAPI shape; hadash.api.hostbulk checks each
    item's fields with HostSettingsSerializer itself)."""

    name = serializers.CharField(max_length=255, help_text="The host's name.")


class HostBulkSettingsSerializer(serializers.Serializer):
    """`POST /api/v1/hosts/bulk`: change many hosts' operator-set fields at once, all
    or none."""

    hosts = HostBulkItemSerializer(
        many=True, allow_empty=False, max_length=MAX_HOST_BULK,
        help_text="The hosts to change, each with the fields PATCH /api/v1/hosts/{name} "
                  f"takes (at most {MAX_HOST_BULK}).",
    )


class HostBulkResultSerializer(serializers.Serializer):
    count = serializers.IntegerField(help_text="How many hosts the request named.")
    changed = serializers.ListField(
        child=serializers.CharField(),
        help_text="The hosts whose settings changed (each with a `SettingsChanged` "
                  "event), in the order of the request; a host already so is not.")


# --- HA work ------------------------------------------------------------------


class HaWorkSerializer(serializers.ModelSerializer):
    vm = serializers.CharField(source="instance.name", read_only=True)
    host = serializers.SlugRelatedField(slug_field="name", read_only=True, allow_null=True)
    target_host = serializers.SlugRelatedField(slug_field="name", read_only=True, allow_null=True)
    state = serializers.CharField(read_only=True, help_text="The VM's state when scheduled.")

    class Meta:
        model = HaWork
        fields = [
            "id", "vm", "type", "step", "reason", "tried", "host", "time_to_try",
            "vm_type", "target_host", "state", "update_count", "taken", "taken_by",
            "created", "updated", "last_error", "placement",
        ]
        read_only_fields = fields
        extra_kwargs = {"placement": {"help_text": "Why the target host was chosen (R24)."}}


# --- events -------------------------------------------------------------------


class EventSerializer(serializers.ModelSerializer):
    class Meta:
        model = Event
        fields = [
            "id", "time", "subject", "subject_name", "event", "field", "old", "new",
            "reason", "message", "alert", "severity", "acknowledged_at",
            "subject_id", "acknowledged_by",
        ]
        read_only_fields = fields


# --- configuration ------------------------------------------------------------


@extend_schema_field(
    {
        "oneOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}],
        "description": 'The new value; text as shown in `value` (e.g. "8"), or a JSON '
        "number/boolean.",
    }
)
class ScalarField(serializers.Field):
    default_error_messages = {"invalid": "value must be a string, a number or a boolean"}

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, (str, int, float, bool)):
            return data
        self.fail("invalid")

    def to_representation(self, value: Any) -> Any:
        return value


class ConfigSerializer(serializers.Serializer):
    """One SPEC §2 key: ``value`` is the stored text in force."""

    name = serializers.CharField(read_only=True)
    value = serializers.CharField(read_only=True)
    default = serializers.CharField(read_only=True)
    type = serializers.ChoiceField(
        choices=["int", "float", "bool", "str", "list"], read_only=True
    )
    category = serializers.CharField(read_only=True)
    description = serializers.CharField(read_only=True)
    min = serializers.FloatField(read_only=True, allow_null=True)
    max = serializers.FloatField(read_only=True, allow_null=True)
    updated = serializers.DateTimeField(read_only=True, allow_null=True)


class ConfigUpdateSerializer(serializers.Serializer):
    value = ScalarField()


# --- shared -------------------------------------------------------------------


SECRET_FIELDS = {"oobm_password"}


def settings_change(obj: Host | VMInstance, changes: dict[str, Any], *,
                    by: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """What storing ``changes`` (validated operator-set fields) on ``obj`` changes:
    (the fields whose value differs, the `SettingsChanged` event's fields for
    hadash.events.record_event — subject and obj aside); ({}, {}) when nothing does. A
    secret's value is never in the event."""
    changed = {f: v for f, v in changes.items() if getattr(obj, f) != v}
    if not changed:
        return {}, {}
    parts = []
    for f, v in changed.items():
        if f in SECRET_FIELDS:
            parts.append(f"{f} changed")
        else:
            parts.append(f"{f} {getattr(obj, f)!r} → {v!r}")
    single = next(iter(changed)) if len(changed) == 1 else None
    old = getattr(obj, single) if single and single not in SECRET_FIELDS else ""
    new = changed[single] if single and single not in SECRET_FIELDS else ""
    who = f" by {by}" if by else ""
    kind = "Host" if isinstance(obj, Host) else "VM"
    return changed, dict(
        event="SettingsChanged",
        field=",".join(changed)[:64],
        old=old,
        new=new,
        reason=by,
        message=f"{kind} {obj.name}: {'; '.join(parts)}{who}",
    )


def apply_settings(obj: Host | VMInstance, changes: dict[str, Any], *, by: str = "",
                   now=None) -> list[str]:
    """Store operator-set fields of a host or VM and write one `SettingsChanged`
    event in the same transaction. Only the given fields are written (an UPDATE of
    those columns), so a concurrent status change by the engine is never overwritten.
    Returns the names of the fields that changed. (Many hosts at once:
    hadash.api.hostbulk, with the same `settings_change`.)"""
    changed, event = settings_change(obj, changes, by=by)
    if not changed:
        return []
    subject = Subject.HOST if isinstance(obj, Host) else Subject.VM
    with transaction.atomic():
        type(obj).objects.filter(pk=obj.pk).update(**changed)
        for f, v in changed.items():
            setattr(obj, f, v)
        record_event(subject, obj, now=now or timezone.now(), **event)
    return list(changed)
