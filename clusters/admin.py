from django.contrib import admin

from .models import Cluster, FailoverPlan


@admin.register(FailoverPlan)
class FailoverPlanAdmin(admin.ModelAdmin):
    """Read-only: plans are computed by the engine (R22)."""
    list_display = ("cluster", "capacity", "level", "ha_vms", "hosts", "computed_at", "took_ms")
    readonly_fields = [f.name for f in FailoverPlan._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Cluster)
class ClusterAdmin(admin.ModelAdmin):
    """A cluster's own settings: its HA mode overrides the installation's (R26). A
    change goes through hadash.ha.modes (its event, its alert while not armed, and a
    re-examination of every host and VM when armed again)."""
    list_display = ("name", "ha_mode")
    fields = ("name", "ha_mode")

    def get_readonly_fields(self, request, obj=None):
        return ("name",) if obj is not None else ()

    def save_model(self, request, obj, form, change) -> None:
        from django.utils import timezone

        from hadash.ha import modes

        new_mode = obj.ha_mode
        if not change:
            obj.ha_mode = ""
            obj.save()
        modes.set_cluster_mode(obj.name, new_mode, now=timezone.now(),
                               by=request.user.get_username())
        modes.reconcile(now=timezone.now())
        obj.refresh_from_db()

