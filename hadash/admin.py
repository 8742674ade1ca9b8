"""Django admin for the HA manager's own tables: configuration (edited here, SPEC §2),
events, incidents and alerts (R18, R19: read-only, alerts acknowledged), HA work,
operator API tokens."""

from __future__ import annotations

from django.contrib import admin, messages
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from . import alerts, config
from .models import Alert, ApiToken, Configuration, Event, HaWork, Incident, IncidentVm


def _bound(n: float | None) -> str:
    if n is None:
        return ""
    return str(int(n)) if float(n).is_integer() else str(n)


def describe_key(k: config.Key) -> str:
    parts = [f"Type {k.type}"]
    if k.min is not None and k.max is not None:
        parts.append(f"from {_bound(k.min)} to {_bound(k.max)}")
    elif k.min is not None:
        parts.append(f"at least {_bound(k.min)}")
    elif k.max is not None:
        parts.append(f"at most {_bound(k.max)}")
    if k.type == "bool":
        parts.append("true or false")
    if k.type == "list":
        parts.append("comma-separated")
    parts.append(f"default {k.default!r}")
    return "; ".join(parts) + ". " + k.description


@admin.register(Configuration)
class ConfigurationAdmin(admin.ModelAdmin):
    """SPEC §2 keys. The form validates through Configuration.clean() and saves through
    hadash.config.set_value, so an edit writes a ConfigChanged event and takes effect
    at once."""

    list_display = ("name", "value", "default_value", "category", "updated")
    list_filter = ("category",)
    search_fields = ("name", "description")
    fields = ("name", "value", "default_value", "value_type", "category", "description",
              "updated")
    readonly_fields = ("name", "default_value", "value_type", "category", "description",
                       "updated")

    @admin.display(description="type")
    def value_type(self, obj: Configuration) -> str:
        try:
            return obj.type
        except config.ConfigError:
            return "?"

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change=change, **kwargs)
        if obj is not None and "value" in form.base_fields:
            try:
                form.base_fields["value"].help_text = describe_key(obj.key)
            except config.ConfigError:
                pass
        return form

    def has_add_permission(self, request) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def save_model(self, request, obj: Configuration, form, change) -> None:
        # The form has already run Configuration.clean() (validated and normalised).
        try:
            config.set_value(
                obj.name, obj.value, now=timezone.now(), by=request.user.get_username()
            )
        except config.ConfigError as exc:  # changed meanwhile by someone else's rules
            self.message_user(request, str(exc), messages.ERROR)
        obj.refresh_from_db()


class AcknowledgedFilter(admin.SimpleListFilter):
    title = "acknowledged"
    parameter_name = "acknowledged"

    def lookups(self, request, model_admin):
        return (("no", "Open alerts"), ("yes", "Acknowledged"))

    def queryset(self, request, queryset):
        if self.value() == "no":
            return queryset.filter(alert=True, acknowledged_at__isnull=True)
        if self.value() == "yes":
            return queryset.filter(acknowledged_at__isnull=False)
        return queryset


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Event)
class EventAdmin(ReadOnlyAdmin):
    list_display = ("id", "time", "subject", "subject_name", "event", "change", "alert",
                    "severity", "acknowledged")
    list_display_links = ("id", "time")
    list_filter = (AcknowledgedFilter, "subject", "alert", "severity", "event")
    search_fields = ("subject_name", "message")
    ordering = ("-id",)
    show_full_result_count = False
    actions = ["acknowledge"]

    @admin.display(description="change")
    def change(self, obj: Event) -> str:
        if not (obj.old or obj.new):
            return obj.field
        prefix = f"{obj.field}: " if obj.field else ""
        return f"{prefix}{obj.old or '—'} → {obj.new or '—'}"

    @admin.display(boolean=True, description="acknowledged")
    def acknowledged(self, obj: Event) -> bool | None:
        return obj.acknowledged_at is not None if obj.alert else None

    def has_acknowledge_permission(self, request) -> bool:
        return request.user.has_perm("hadash.change_event")

    @admin.action(permissions=["acknowledge"], description="Acknowledge selected alerts")
    def acknowledge(self, request, queryset):
        now, by = timezone.now(), request.user.get_username()
        n = queryset.filter(alert=True, acknowledged_at__isnull=True).update(
            acknowledged_at=now, acknowledged_by=by
        )
        # R19: the alerts of the selected events' incidents too.
        incidents = queryset.filter(incident__isnull=False).values("incident_id")
        alerts.acknowledge(Alert.objects.filter(incident_id__in=incidents), by=by, now=now)
        self.message_user(request, f"Acknowledged {n} alert(s).", messages.SUCCESS)


# --- incidents and alerts (R18, R19) -------------------------------------------------------


class IncidentVmInline(admin.TabularInline):
    model = IncidentVm
    fields = ("vm_name", "ha", "outcome", "down_since", "running_at", "downtime",
              "target_host_name", "detail")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = False

    @admin.display(description="downtime (s)")
    def downtime(self, obj: IncidentVm) -> str:
        d = obj.downtime
        return "" if d is None else f"{d:.1f}"

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Incident)
class IncidentAdmin(ReadOnlyAdmin):
    """Incidents are the engine's (hadash.incidents): browsed here, changed nowhere."""

    list_display = ("id", "kind", "subject", "cluster", "state", "detected_at",
                    "declared_at", "resolved_at", "vms_affected", "vms_restarted",
                    "vms_failed", "page")
    list_display_links = ("id", "subject")
    list_filter = ("state", "kind", "cluster")
    search_fields = ("host_name", "vm_name", "title")
    ordering = ("-id",)
    date_hierarchy = "detected_at"
    show_full_result_count = False
    inlines = [IncidentVmInline]
    exclude = ("host", "vm")

    @admin.display(description="subject")
    def subject(self, obj: Incident) -> str:
        return obj.host_name if obj.kind == "host" else obj.vm_name

    @admin.display(description="dashboard")
    def page(self, obj: Incident) -> str:
        return format_html('<a href="{}">incident page</a>',
                           reverse("dash:incident", args=[obj.pk]))


class AlertAcknowledgedFilter(admin.SimpleListFilter):
    title = "acknowledged"
    parameter_name = "acknowledged"

    def lookups(self, request, model_admin):
        return (("no", "Not acknowledged"), ("yes", "Acknowledged"))

    def queryset(self, request, queryset):
        if self.value() == "no":
            return queryset.filter(acknowledged_at__isnull=True)
        if self.value() == "yes":
            return queryset.filter(acknowledged_at__isnull=False)
        return queryset


@admin.register(Alert)
class AlertAdmin(ReadOnlyAdmin):
    """R19: one alert per incident or per (kind, subject); they open and resolve by
    themselves (hadash.alerts). An operator only acknowledges them."""

    list_display = ("id", "severity", "state", "kind", "title", "count", "cluster",
                    "opened_at", "resolved_at", "acknowledged")
    list_display_links = ("id", "title")
    list_filter = ("state", AlertAcknowledgedFilter, "severity", "kind", "subject")
    search_fields = ("title", "subject_name", "message")
    ordering = ("-id",)
    show_full_result_count = False
    actions = ["acknowledge"]
    exclude = ("incident",)
    readonly_fields = ("incident_link",)

    @admin.display(boolean=True, description="acknowledged")
    def acknowledged(self, obj: Alert) -> bool:
        return obj.acknowledged_at is not None

    @admin.display(description="incident")
    def incident_link(self, obj: Alert) -> str:
        if not obj.incident_id:
            return "—"
        return format_html('<a href="{}">incident {}</a>',
                           reverse("dash:incident", args=[obj.incident_id]), obj.incident_id)

    def has_acknowledge_permission(self, request) -> bool:
        return request.user.has_perm("hadash.change_alert")

    @admin.action(permissions=["acknowledge"], description="Acknowledge selected alerts")
    def acknowledge(self, request, queryset):
        n = alerts.acknowledge(queryset, by=request.user.get_username(), now=timezone.now())
        self.message_user(request, f"Acknowledged {n} alert(s).", messages.SUCCESS)


@admin.register(HaWork)
class HaWorkAdmin(ReadOnlyAdmin):
    list_display = ("id", "instance", "type", "step", "reason", "tried", "host", "taken_by",
                    "time_to_try", "updated")
    list_filter = ("step", "type", "reason")
    search_fields = ("instance__name", "host__name", "taken_by")
    list_select_related = ("instance", "host")
    ordering = ("-id",)
    show_full_result_count = False


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Tokens are made with `manage.py apitoken`; deleting one revokes it."""

    list_display = ("prefix", "user", "created", "last_used")
    list_select_related = ("user",)
    search_fields = ("user__username", "prefix")
    fields = ("prefix", "user", "created", "last_used")
    readonly_fields = fields

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False
