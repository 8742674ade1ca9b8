"""Websocket routes. Agent ping sockets authenticate with their host token
(PROTOCOL.md, websocket transport); dashboard sockets come with the dashboard."""

websocket_urlpatterns: list = []
