"""Operator REST API, mounted at /api/v1/ (PROTOCOL.md, Operator API)."""

from django.urls import include, path, re_path
from rest_framework.permissions import AllowAny

from . import bulk, hostbulk, plan, views

api_patterns = [
    path("hosts", views.HostListView.as_view(), name="host-list"),
    # Before hosts/<name>: POST there is many hosts' settings; GET and PATCH still reach
    # a host named "bulk" (issue 12).
    path("hosts/bulk", hostbulk.HostBulkView.as_view(), name="host-bulk"),
    path("hosts/<str:name>", views.HostDetailView.as_view(), name="host-detail"),
    path("hosts/<str:name>/enable", views.HostEnableView.as_view(), name="host-enable"),
    path("hosts/<str:name>/disable", views.HostDisableView.as_view(), name="host-disable"),
    path(
        "hosts/<str:name>/maintenance",
        views.HostMaintenanceView.as_view(),
        name="host-maintenance",
    ),
    path(
        "hosts/<str:name>/cancel-maintenance",
        views.HostCancelMaintenanceView.as_view(),
        name="host-cancel-maintenance",
    ),
    path("hosts/<str:name>/reenrol", views.HostReenrolView.as_view(), name="host-reenrol"),
    path("vms", views.VMListView.as_view(), name="vm-list"),
    # Before vms/<name>: "bulk" is not a VM's name here (issue 12).
    path("vms/bulk", bulk.VMBulkView.as_view(), name="vm-bulk"),
    path("vms/<str:name>", views.VMDetailView.as_view(), name="vm-detail"),
    path("vms/<str:name>/stop", views.VMStopView.as_view(), name="vm-stop"),
    path("vms/<str:name>/start", views.VMStartView.as_view(), name="vm-start"),
    path("vms/<str:name>/definition", views.VMDefinitionView.as_view(), name="vm-definition"),
    path("unmanaged-vms", views.UnmanagedVmListView.as_view(), name="unmanaged-vm-list"),
    path("unmanaged-vms/adopt", views.UnmanagedVmAdoptView.as_view(),
         name="unmanaged-vm-adopt"),
    path("ha-work", views.HaWorkListView.as_view(), name="ha-work-list"),
    path("ha-work/<int:pk>", views.HaWorkDetailView.as_view(), name="ha-work-detail"),
    path("events", views.EventListView.as_view(), name="event-list"),
    path("events/<int:pk>", views.EventDetailView.as_view(), name="event-detail"),
    path(
        "events/<int:pk>/acknowledge",
        views.EventAcknowledgeView.as_view(),
        name="event-acknowledge",
    ),
    path("config", views.ConfigListView.as_view(), name="config-list"),
    path("config/<str:key>", views.ConfigDetailView.as_view(), name="config-detail"),
    path("engine", views.EngineStatusView.as_view(), name="engine-status"),
    path("", include("notify.api")),  # R20: notification-channels, deliveries
    path("", include("hadash.api.incidents")),  # R18, R19: incidents, alerts
    path("", include("hadash.api.groups")),  # R25: vm-groups
    path("", include("hadash.api.modes")),  # R26: ha-mode, clusters/{name}/ha-mode
    # R22: clusters, their failover plans, "what if hosts X, Y fail now?"
    path("clusters", plan.ClusterListView.as_view(), name="cluster-list"),
    path("clusters/<str:name>/failover-plan", plan.ClusterPlanView.as_view(),
         name="cluster-failover-plan"),
    path("clusters/<str:name>/what-if", plan.ClusterWhatIfView.as_view(),
         name="cluster-what-if"),
]

# The document covers the operator API only (the agent protocol is PROTOCOL.md).
schema_patterns = [path("api/v1/", include(api_patterns))]

urlpatterns = [
    path("", views.api_index, name="api-index"),
    *api_patterns,
    path(
        "openapi.json",
        views.OpenApiDocumentView.as_view(
            authentication_classes=[],
            permission_classes=[AllowAny],
            patterns=schema_patterns,
        ),
        name="openapi",
    ),
    path("docs", views.api_docs, name="api-docs"),
    # Last: any other path under /api/v1/ is a JSON 404, never the site's HTML page.
    re_path(r"^(?P<rest>.*)$", views.api_not_found, name="api-not-found"),
]
