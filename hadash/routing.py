"""Websocket routes.

- api/agent/v1/ws: agent ping sockets (PROTOCOL.md), authenticated by host token;
  agents are not browsers, so no Origin check there.
- ws/events: dashboard sockets, for logged-in users from an allowed origin.
"""

from channels.auth import AuthMiddlewareStack
from channels.security.websocket import AllowedHostsOriginValidator
from django.urls import path

from hadash.consumers import EventsConsumer
from hosts.agent.consumers import AgentPingConsumer

websocket_urlpatterns: list = [
    path("api/agent/v1/ws", AgentPingConsumer.as_asgi()),
    path("ws/events", AllowedHostsOriginValidator(AuthMiddlewareStack(EventsConsumer.as_asgi()))),
]
