"""Django admin for hosts. Everything a host's agent or the HA engine maintains is
read-only here; operators set tags and out-of-band management (Redfish BMC) settings,
saved column by column with a `SettingsChanged` event, and run the resource-state
actions (enable, disable, maintenance) through hadash.ha.actions, and re-enrolment
(R29: one join-key connect may take the host within an hour). The agent's credentials
(token hash, server token) are never shown or editable here."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.utils import timezone
from rest_framework import serializers as drf_serializers

from hadash.api.serializers import HOST_SETTINGS, TagsField, apply_settings
from hadash.ha import actions

from .models import Host

# R29: what an operator — and only an operator — changes about an enrolled host (a
# connect keeps them as enrolled).
OPERATOR_FIELDS = ("type", "cluster")


class HostForm(forms.ModelForm):
    oobm_password = forms.CharField(
        label="BMC password",
        required=False,
        strip=False,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Leave empty to keep the stored password.",
    )
    clear_oobm_password = forms.BooleanField(label="Clear the stored BMC password",
                                             required=False)

    class Meta:
        model = Host
        fields = [*HOST_SETTINGS, *OPERATOR_FIELDS]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in OPERATOR_FIELDS:
            if name in self.fields:
                # Left out of a post: kept as it is.
                self.fields[name].required = False

    def clean_type(self) -> str:
        return self.cleaned_data.get("type") or self.instance.type

    def clean_cluster(self) -> str:
        value = (self.cleaned_data.get("cluster") or "").strip() or self.instance.cluster
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise forms.ValidationError("A cluster name has no control characters.")
        return value

    def clean_tags(self) -> str:
        try:
            return TagsField().to_internal_value(self.cleaned_data.get("tags") or "")
        except drf_serializers.ValidationError as exc:
            raise forms.ValidationError(exc.detail) from None

    def clean(self):
        data = super().clean()
        if not data.get("oobm_password") and not data.get("clear_oobm_password"):
            data["oobm_password"] = self.instance.oobm_password
        if data.get("clear_oobm_password"):
            data["oobm_password"] = ""
        if data.get("oobm_enabled") and not (
            data.get("oobm_address") and data.get("oobm_system_id")
        ):
            raise forms.ValidationError(
                "Out-of-band management needs a BMC address and a Redfish system id."
            )
        return data


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    form = HostForm
    list_display = ("name", "status", "resource_state", "cluster", "last_ping", "cpus",
                    "memory_mb", "type", "tags")
    list_filter = ("status", "resource_state", "cluster", "type")
    search_fields = ("name", "private_ip_address")
    show_full_result_count = False
    readonly_fields = ("name", "uuid", "hypervisor_type", "status",
                       "resource_state", "last_ping", "cpus", "memory_mb",
                       "private_ip_address", "agent_url", "next_investigation",
                       "reenrol_until", "update_count", "created")
    fieldsets = (
        (None, {"fields": ("name", "uuid", "type", "hypervisor_type", "cluster",
                           "private_ip_address", "agent_url")}),
        ("State", {"fields": ("status", "resource_state", "last_ping", "next_investigation",
                              "reenrol_until", "update_count", "created")}),
        ("Capacity and tags", {"fields": ("cpus", "memory_mb", "tags")}),
        ("Out-of-band management (Redfish)", {
            "fields": ("oobm_enabled", "oobm_address", "oobm_system_id", "oobm_username",
                       "oobm_password", "clear_oobm_password"),
        }),
    )
    actions = ["enable_hosts", "disable_hosts", "prepare_maintenance", "cancel_maintenance",
               "allow_reenrol"]

    def has_add_permission(self, request) -> bool:
        return False  # hosts join by connecting their agent (PROTOCOL.md)

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def save_model(self, request, obj: Host, form, change) -> None:
        current = Host.objects.get(pk=obj.pk)
        apply_settings(
            current,
            {f: form.cleaned_data[f] for f in (*HOST_SETTINGS, *OPERATOR_FIELDS)
             if f in form.cleaned_data},
            by=request.user.get_username(),
            now=timezone.now(),
        )

    def _run(self, request, queryset, label: str, fn) -> None:
        done, now, by = 0, timezone.now(), request.user.get_username()
        for host in queryset:
            try:
                fn(host, now=now, by=by)
                done += 1
            except actions.ActionError as exc:
                self.message_user(request, f"{host.name}: {exc}", messages.ERROR)
        if done:
            self.message_user(request, f"{label}: {done} host(s).", messages.SUCCESS)

    @admin.action(permissions=["change"], description="Enable selected hosts")
    def enable_hosts(self, request, queryset):
        self._run(request, queryset, "Enabled",
                  lambda h, **kw: actions.set_host_enabled(h, True, **kw))

    @admin.action(permissions=["change"], description="Disable selected hosts")
    def disable_hosts(self, request, queryset):
        self._run(request, queryset, "Disabled",
                  lambda h, **kw: actions.set_host_enabled(h, False, **kw))

    @admin.action(permissions=["change"], description="Prepare selected hosts for maintenance")
    def prepare_maintenance(self, request, queryset):
        self._run(request, queryset, "Preparing for maintenance",
                  lambda h, **kw: actions.prepare_maintenance(h, **kw))

    @admin.action(permissions=["change"], description="Cancel maintenance of selected hosts")
    def cancel_maintenance(self, request, queryset):
        self._run(request, queryset, "Maintenance cancelled",
                  lambda h, **kw: actions.cancel_maintenance(h, **kw))

    @admin.action(permissions=["change"],
                  description="Re-enrol selected hosts (one join-key connect within an hour)")
    def allow_reenrol(self, request, queryset):
        """R29: lets one agent connect with the join key take each selected host within
        the hour (e.g. its machine was reinstalled and lost its token)."""
        now, by = timezone.now(), request.user.get_username()
        done = [host.name for host in queryset if host.allow_reenrol(now=now, by=by)]
        if done:
            self.message_user(
                request,
                f"Re-enrolment allowed for one hour: {', '.join(done)}. The next agent "
                "connect with the join key under that name takes the host; its current "
                "token works until then.",
                messages.WARNING,
            )
