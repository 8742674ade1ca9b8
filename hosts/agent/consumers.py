"""Websocket transport for pings (PROTOCOL.md, "Websocket transport for pings").

An agent holds one socket at /api/agent/v1/ws, authenticated on the upgrade request
with ``Authorization: Bearer <host token>`` (a wrong token refuses the upgrade). Each
text message ``{"type": "ping", "vms": [...]}`` means exactly ``POST /ping`` and is
answered ``{"type": "pong", "ping_interval": N}``, or ``{"type": "error", "error": …}``
for a malformed message, which changes nothing. Closing the socket is not a
disconnect (R7 needs an explicit goodbye): the host simply stops pinging.
"""

from __future__ import annotations

import json

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from . import ingest, validation
from .auth import bearer, host_for_token
from .ingest import TokenRevoked
from .validation import ProtocolError

# Close code when the host's token stops being valid mid-connection (the agent
# reconnected and got a new token): 4000 + the HTTP status, as is customary.
CLOSE_UNAUTHORIZED = 4401


def _authenticate(token: str | None):
    return host_for_token(token)


class AgentPingConsumer(AsyncWebsocketConsumer):
    token: str | None = None

    async def connect(self) -> None:
        token = bearer(self.scope.get("headers") or [])
        host = await database_sync_to_async(_authenticate)(token)
        if host is None:
            await self.close()  # before accept: the upgrade is refused (HTTP 403)
            return
        self.token = token
        self.host_name = host.name
        await self.accept()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None):
        if text_data is None:
            await self._send({"type": "error", "error": "send pings as text messages"})
            return
        try:
            vms = validation.parse_ws_message(text_data)
        except ProtocolError as exc:
            await self._send({"type": "error", "error": exc.message})
            return
        try:
            # Batched with the other sockets' pings (hosts.agent.ingest); the token is
            # re-checked there, since a reconnect rotates it.
            interval = await ingest.batcher().submit(self.token, vms)
        except TokenRevoked:
            await self._send({"type": "error", "error": "invalid host token; reconnect"})
            await self.close(code=CLOSE_UNAUTHORIZED)
            return
        await self._send({"type": "pong", "ping_interval": interval})

    async def disconnect(self, code) -> None:
        # Not a goodbye (PROTOCOL.md): the host is judged by its pings alone.
        pass

    async def _send(self, message: dict) -> None:
        await self.send(text_data=json.dumps(message))
