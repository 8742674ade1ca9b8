from django.contrib import admin

from .models import FailoverPlan


@admin.register(FailoverPlan)
class FailoverPlanAdmin(admin.ModelAdmin):
    """Read-only: plans are computed by the engine (R22)."""
    list_display = ("cluster", "capacity", "level", "ha_vms", "hosts", "computed_at", "took_ms")
    readonly_fields = [f.name for f in FailoverPlan._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
