"""Agent protocol v1 (PROTOCOL.md), mounted at /api/agent/v1/. The websocket
transport for pings (/api/agent/v1/ws) is routed in hadash/routing.py."""

from django.urls import path

from . import views

app_name = "agent"

urlpatterns = [
    path("connect", views.connect, name="connect"),
    path("ping", views.ping, name="ping"),
    path("disconnect", views.disconnect, name="disconnect"),
]
