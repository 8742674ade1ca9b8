"""Websocket transport for pings (PROTOCOL.md, "Websocket transport for pings").

An agent holds one socket at /api/agent/v1/ws, authenticated on the upgrade request
with ``Authorization: Bearer <host token>`` (a wrong token refuses the upgrade). Each
text message ``{"type": "ping", "vms": [...]}`` means exactly ``POST /ping`` and is
answered ``{"type": "pong", "ping_interval": N}``, or ``{"type": "error", "error": …}``
for a malformed message, which changes nothing. Closing the socket is not a
disconnect (R7 needs an explicit goodbye): the host simply stops pinging.

Built for 10,000 sockets per web process (docs/benchmarks.md §1, proposals P2, P4, P5):
an agent socket has no channel layer (nothing is ever sent to an agent through one), a
ping does not pay Channels' per-message database clean-up (the consumer never touches
the database while it handles one), and each ping is stamped with its arrival time
before it waits in the batcher.

Per message it does as little as it can (issue 12: within 0.9 of a bare Channels
consumer on the same server): an agent sends the same report over and over while
nothing changes, so a message equal to the socket's previous one reuses that one's
validated report instead of parsing it again (validation is a pure function of the
text); the token's hash is taken once per connection; the pong text is made once per
ping interval; the batcher is looked up once per socket.

The token check of a socket's upgrade runs in the agent protocol's own database threads
(hosts.agent.dbpool), on their long-lived connections, as the HTTP requests' do — not
in Channels' one shared sync thread with a new PostgreSQL connection per socket, where
a fleet connecting at once queued behind every other sync call of the process (an
operator's bulk registration took seconds) and its first pings came too late (issue 12:
at ping.interval 1, 1,000 connecting hosts drew a PingTimeout storm). So the consumer
never uses Channels' per-message connection clean-up at all.
"""

from __future__ import annotations

import json
import logging

from channels.consumer import get_handler_name
from channels.generic.websocket import AsyncWebsocketConsumer
from django.utils import timezone

from hosts.models import Host

from . import dbpool, ingest, validation
from .auth import bearer, host_for_token
from .ingest import TokenRevoked
from .validation import ProtocolError

log = logging.getLogger("hadash.agent")

# Close code when the host's token stops being valid mid-connection (an operator
# re-enrolled the host and a join-key connect took it): 4000 + the HTTP status, as is customary.
CLOSE_UNAUTHORIZED = 4401

# A channel layer alias that is never configured: channels.layers.get_channel_layer
# returns None for it, so an agent socket creates no channel and runs no receive loop
# on the layer (with the in-memory layer every new channel made each receive scan all
# of them: connecting N agents cost O(N²); with Redis, a channel and a poll per agent).
NO_CHANNEL_LAYER = "hadash-agent-sockets-use-no-channel-layer"


_PONGS: dict[object, str] = {}  # ping interval → the pong's text


def _authenticate(token: str | None):
    return host_for_token(token)


class AgentPingConsumer(AsyncWebsocketConsumer):
    token: str | None = None
    channel_layer_alias = NO_CHANNEL_LAYER  # P4: agents are sent nothing through it

    async def dispatch(self, message) -> None:
        """AsyncConsumer.dispatch without Channels' aclose_old_connections(), a hop
        into the one thread-sensitive sync thread per message (P2): the consumer's
        database work runs in hosts.agent.dbpool's threads (the token check) and the
        batcher's (pings), which keep their own connections."""
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def connect(self) -> None:
        token = bearer(self.scope.get("headers") or [])
        host = await dbpool.run(_authenticate, token)
        if host is None:
            await self.close()  # before accept: the upgrade is refused (HTTP 403)
            return
        self.token = token
        self.digest = ingest.Digest(Host.hash_token(token))  # the batcher's key
        self.host_name = host.name
        self._last_text: str | None = None  # the previous message and its report
        self._last_vms = None
        self._batcher = None
        await self.accept()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None):
        arrival = timezone.now()  # R1/R2: last_ping is when the ping came in (P5)
        if text_data is None:
            await self._send({"type": "error", "error": "send pings as text messages"})
            return
        if text_data == self._last_text:
            vms = self._last_vms
        else:
            try:
                vms = validation.parse_ws_message(text_data)
            except ProtocolError as exc:
                await self._send({"type": "error", "error": exc.message})
                return
            # Reused only while unchanged, and only a plain report: one carrying
            # definitions (or refusing some) is taken whole each time it comes.
            plain = not vms.definitions and not vms.refused
            self._last_text, self._last_vms = (text_data, vms) if plain else (None, None)
        b = self._batcher
        if b is None or b.task.done():
            b = self._batcher = ingest.batcher()
        try:
            # Batched with the other sockets' pings (hosts.agent.ingest); the token is
            # re-checked there, since a re-enrolment replaces it.
            interval = await b.submit(self.digest, vms, arrival)
        except TokenRevoked:
            await self._send({"type": "error", "error": "invalid host token; reconnect"})
            await self.close(code=CLOSE_UNAUTHORIZED)
            return
        except Exception as exc:
            # This ping could not be stored (the batch logged why). The socket stays
            # up: the agent's next ping is tried afresh, and nobody else is affected.
            log.warning("ping from %s not applied: %r", self.host_name, exc)
            await self._send({"type": "error",
                              "error": "the server could not apply this ping (nothing "
                                       "was changed); it will take the next one"})
            return
        pong = _PONGS.get(interval)
        if pong is None:
            pong = _PONGS[interval] = json.dumps({"type": "pong", "ping_interval": interval})
        await self.send(text_data=pong)

    async def disconnect(self, code) -> None:
        # Not a goodbye (PROTOCOL.md): the host is judged by its pings alone.
        pass

    async def _send(self, message: dict) -> None:
        await self.send(text_data=json.dumps(message))
