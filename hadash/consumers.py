"""Dashboard websocket: every committed event, live, with resume (hadash.live).

Connect to /ws/events (logged-in users only; the origin must be an allowed host),
optionally with ?after=<watermark>. Messages to the client:
  {"type": "events", "events": [...], "watermark": N}   a batch (oldest first)
  {"type": "reload", "watermark": N}                     too much missed: reload page
The client keeps the highest watermark it received and the ids it holds; on reconnect
it asks for ?after=<watermark> and drops ids it already has.
"""

from __future__ import annotations

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from . import live


class EventsConsumer(AsyncJsonWebsocketConsumer):
    group = None

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close()  # before accept: the upgrade is refused (403)
            return
        relay = await live.relay()
        self.group = relay.group
        # Join first, then read the backlog: nothing committed in between is lost
        # (duplicates are dropped by id on the client).
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        after = self._after()
        if after is None:
            await self.send_json({"type": "events", "events": [],
                                  "watermark": relay.watermark})
            return
        backlog = await database_sync_to_async(live.fetch)(after, (), live.BACKLOG_MAX + 1)
        if len(backlog) > live.BACKLOG_MAX:
            await self.send_json({"type": "reload", "watermark": relay.watermark})
            return
        await self.send_json({"type": "events", "events": backlog,
                              "watermark": max(relay.watermark, after)})

    def _after(self) -> int | None:
        from urllib.parse import parse_qs

        qs = parse_qs((self.scope.get("query_string") or b"").decode())
        try:
            return max(0, int(qs["after"][0]))
        except (KeyError, ValueError, IndexError):
            return None

    async def events_batch(self, message):
        await self.send_json({"type": "events", "events": message["events"],
                              "watermark": message["watermark"]})

    async def receive_json(self, content, **kwargs):
        pass  # the dashboard only listens

    async def disconnect(self, code):
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)
