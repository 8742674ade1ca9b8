from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/agent/v1/", include("hosts.agent.urls")),
    path("api/v1/", include("hadash.api.urls")),
]
