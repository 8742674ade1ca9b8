from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

urlpatterns = [
    # The live dashboard takes "/" over; until then operators land in admin.
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
    path("admin/", admin.site.urls),
    path("api/agent/v1/", include("hosts.agent.urls")),
    path("api/v1/", include("hadash.api.urls")),
]
