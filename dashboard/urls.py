from django.urls import include, path

from . import alerts, incidents, views
from . import clusters as cluster_pages  # R22
from . import modes as ha_modes  # R26

app_name = "dash"

urlpatterns = [
    path("", views.overview, name="overview"),
    path("summary.json", views.summary_json, name="summary"),
    path("alerts.json", alerts.alerts_json, name="alerts"),  # R19
    path("alerts/<int:pk>/ack", alerts.acknowledge, name="ack"),
    path("alerts/ack-all", alerts.acknowledge_all, name="ack-all"),
    path("hosts", views.hosts_page, name="hosts"),  # issue 10 item 6
    path("hosts/<str:name>", views.host, name="host"),
    path("hosts/<str:name>/reenrol", views.host_reenrol, name="host-reenrol"),  # R29
    path("hosts/<str:name>/<str:action>", views.host_action, name="host-action"),
    path("vms", views.vms_page, name="vms"),  # issue 10 item 6
    path("vms/<str:name>", views.vm, name="vm"),
    path("vms/<str:name>/<str:action>", views.vm_action, name="vm-action"),
    path("work", views.work, name="work"),
    path("incidents", incidents.incidents_page, name="incidents"),  # R18
    path("incidents/<int:pk>", incidents.incident_view, name="incident"),
    path("config", views.config_page, name="config"),
    path("ha-mode", ha_modes.ha_mode_page, name="ha-mode"),  # R26
    path("", include("notify.urls")),  # R20: notifications page, send test
    path("unmanaged", views.unmanaged_page, name="unmanaged"),  # issue 9
    path("unmanaged/adopt", views.unmanaged_adopt, name="unmanaged-adopt"),
    path("clusters", cluster_pages.clusters_page, name="clusters"),  # R22
    path("clusters/<str:name>", cluster_pages.cluster_page, name="cluster"),
    path("fleet", views.fleet_page, name="fleet"),
    path("fleet/hosts.json", views.fleet_hosts_json, name="fleet-hosts"),
    path("fleet/fault", views.fleet_fault, name="fleet-fault"),
]
