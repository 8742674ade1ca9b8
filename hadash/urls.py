from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.contrib.staticfiles.views import serve as static_serve
from django.urls import include, path, re_path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/agent/v1/", include("hosts.agent.urls")),
    path("api/v1/", include("hadash.api.urls")),
    path("", include("metrics.urls")),  # GET /metrics (R21)
    path("login/", auth_views.LoginView.as_view(redirect_authenticated_user=True),
         name="login"),
    path("logout/", auth_views.LogoutView.as_view(next_page="login"), name="logout"),
    # daphne serves no static files itself: the dashboard's few small files (CSS and
    # JavaScript, found in the apps' static/ directories) are served from here, also
    # with DEBUG off. A deployment behind a web server may serve `collectstatic`'s
    # STATIC_ROOT instead.
    re_path(r"^static/(?P<path>.*)$", static_serve, {"insecure": True}),
    path("", include("dashboard.urls")),
]
