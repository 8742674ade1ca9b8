"""Django admin for VMs. State and placement belong to the HA engine and are read-only
here; operators set ha_enabled and priority (saved column by column with a
`SettingsChanged` event) and can queue a stop through hadash.ha.actions."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.utils import timezone

from hadash.api.serializers import VM_SETTINGS, apply_settings
from hadash.choices import WorkType
from hadash.ha import actions

from . import groups
from .models import UnmanagedVm, VmGroup, VMInstance


@admin.register(VMInstance)
class VMInstanceAdmin(admin.ModelAdmin):
    list_display = ("name", "state", "power_state", "host", "last_host", "ha_enabled",
                    "priority", "type", "cpus", "memory_mb")
    list_filter = ("state", "power_state", "ha_enabled", "type", "priority")
    search_fields = ("name", "host__name")
    list_select_related = ("host", "last_host")
    show_full_result_count = False
    fields = ("name", "uuid", "type", "state", "power_state", "host", "last_host",
              "power_host", "power_state_update_time", "power_state_update_count",
              "ha_enabled", "priority", "cpus", "memory_mb", "update_count", "created")
    readonly_fields = tuple(f for f in fields if f not in VM_SETTINGS)
    actions = ["stop_vms"]

    def has_add_permission(self, request) -> bool:
        return False  # register VMs with POST /api/v1/vms

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def get_form(self, request, obj=None, **kwargs):
        base = super().get_form(request, obj, **kwargs)

        class AdmissionForm(base):
            def clean(self):
                """R23 enforce: turning HA on for a VM that would push its cluster
                below the failover level is refused with the reason."""
                data = super().clean()
                if obj is not None and data.get("ha_enabled") and not obj.ha_enabled:
                    from clusters import admission
                    from hadash import config

                    why = admission.refusal_for_vm(obj, ha_enabled=True,
                                                   cfg=config.snapshot())
                    if why:
                        raise forms.ValidationError(
                            f"refused by admission control (ha.admission enforce): {why}")
                return data

        return AdmissionForm

    def save_model(self, request, obj: VMInstance, form, change) -> None:
        current = VMInstance.objects.get(pk=obj.pk)
        apply_settings(
            current,
            {f: form.cleaned_data[f] for f in VM_SETTINGS if f in form.cleaned_data},
            by=request.user.get_username(),
            now=timezone.now(),
        )

    @admin.action(permissions=["change"], description="Stop selected VMs (queue Stop work)")
    def stop_vms(self, request, queryset):
        queued, cancelled, unchanged = 0, 0, 0
        now, by = timezone.now(), request.user.get_username()
        for vm in queryset:
            try:
                item = actions.stop_vm(vm, now=now, by=by)
            except actions.ActionError as exc:
                self.message_user(request, f"{vm.name}: {exc}", messages.ERROR)
                continue
            # R15a: a Stopped VM's stop cancels its HA restart, or changes nothing.
            if item is None:
                unchanged += 1
            elif item.type == WorkType.HA:
                cancelled += 1
            else:
                queued += 1
        for n, what in ((queued, "Queued a stop for {} VM(s)."),
                        (cancelled, "Cancelled the HA restart of {} Stopped VM(s)."),
                        (unchanged, "{} VM(s) already Stopped: nothing to do.")):
            if n:
                self.message_user(request, what.format(n), messages.SUCCESS)


@admin.register(UnmanagedVm)
class UnmanagedVmAdmin(admin.ModelAdmin):
    """Read-only: what hosts report that hadash does not manage (issue 9). Adoption is
    the dashboard's Unmanaged VMs page or POST /api/v1/unmanaged-vms/adopt."""

    list_display = ("name", "host", "power_state", "first_seen", "last_seen")
    list_select_related = ("host",)
    search_fields = ("name", "host__name")
    fields = ("name", "host", "power_state", "definition_format", "first_seen", "last_seen")
    readonly_fields = fields

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(VmGroup)
class VmGroupAdmin(admin.ModelAdmin):
    """VM groups (R25): anti-affinity (never two members on one host) or affinity (a
    member's host preferred). Each save and delete is recorded as an event."""

    list_display = ("name", "kind", "cluster", "size")
    list_filter = ("kind",)
    search_fields = ("name", "members__name")
    autocomplete_fields = ("members",)
    fields = ("name", "kind", "cluster", "members")

    @admin.display(description="VMs")
    def size(self, obj) -> int:
        return obj.members.count()

    def save_related(self, request, form, formsets, change) -> None:
        super().save_related(request, form, formsets, change)
        groups.record_saved(form.instance, created=not change, now=timezone.now(),
                            by=request.user.get_username())

    def delete_model(self, request, obj) -> None:
        groups.delete(obj, now=timezone.now(), by=request.user.get_username())

    def delete_queryset(self, request, queryset) -> None:
        for obj in queryset:
            groups.delete(obj, now=timezone.now(), by=request.user.get_username())
