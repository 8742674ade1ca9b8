"""Websocket routes. Agent ping sockets authenticate with their host token
(PROTOCOL.md, websocket transport); dashboard sockets come with the dashboard."""

from django.urls import path

from hosts.agent.consumers import AgentPingConsumer

websocket_urlpatterns: list = [
    path("api/agent/v1/ws", AgentPingConsumer.as_asgi()),
]
