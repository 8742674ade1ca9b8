"""Live events for dashboards, from whichever process committed them.

The in-memory channel layer does not cross processes, and events are written by web
processes, django-q workers and sweeps alike. So every web process runs one *relay*
that reads **committed** events from the database and hands them to its own
dashboard sockets through a per-process channel-layer group:

- on PostgreSQL it LISTENs on `hadash_events`, which a statement trigger on the
  `event` table NOTIFYs at commit (migration 0005) — events reach dashboards within
  milliseconds; it also polls once a second in case a notification is lost;
- on SQLite it polls every 250 ms.

Ids come from a sequence and transactions commit out of order, so a later id can be
visible before an earlier one. The relay remembers such *holes* for HOLE_TTL and
re-reads them; it publishes a *watermark*: every event with an id at or below it has
been delivered (or was rolled back). A client that reconnects asks for everything
after the watermark it last saw and drops ids it already has — so it misses nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref

from asgiref.sync import sync_to_async
from django.db import close_old_connections, connection

from hadash import outage

log = logging.getLogger("hadash.live")

CHANNEL = "hadash_events"
POLL_SQLITE = 0.25
POLL_PG = 1.0
HOLE_TTL = 10.0
BATCH = 2000
BACKLOG_MAX = 5000

FIELDS = ("id", "time", "subject", "subject_id", "subject_name", "event", "field", "old",
          "new", "reason", "message", "alert", "severity", "acknowledged_at", "host_id",
          "vm_id")


def as_json(row: dict) -> dict:
    out = dict(row)
    for k in ("time", "acknowledged_at"):
        if out.get(k) is not None:
            out[k] = out[k].isoformat()
    return out


def fetch(after: int, holes=(), limit: int = BATCH) -> list[dict]:
    """Committed events with id > after (and any of ``holes``), oldest first."""
    from django.db.models import Q

    from hadash.models import Event

    q = Q(id__gt=after)
    if holes:
        q |= Q(id__in=list(holes))
    try:
        rows = list(Event.objects.filter(q).order_by("id").values(*FIELDS)[:limit])
    finally:
        close_old_connections()
    return [as_json(r) for r in rows]


def max_id() -> int:
    """Where the relay starts: the highest id handed out so far. That is the sequence's
    position (PostgreSQL) or the AUTOINCREMENT counter (SQLite): a flushed table may be
    empty while ids go on, and ids skipped before the relay started must not be
    mistaken for holes (they would hold the watermark back)."""
    from django.db.models import Max

    from hadash.models import Event

    top = Event.objects.aggregate(m=Max("id"))["m"] or 0
    if connection.vendor == "postgresql":
        with connection.cursor() as cur:
            cur.execute("SELECT pg_get_serial_sequence('event', 'id')")
            (seq,) = cur.fetchone()
            cur.execute(f"SELECT last_value, is_called FROM {seq}")
            value, called = cur.fetchone()
        top = max(top, value if called else value - 1)
    elif connection.vendor == "sqlite":
        # The same with SQLite's AUTOINCREMENT counter (ids never reused).
        with connection.cursor() as cur:
            cur.execute("SELECT seq FROM sqlite_sequence WHERE name = 'event'")
            row = cur.fetchone()
        top = max(top, row[0] if row else 0)
    close_old_connections()
    return top



def is_database_error(exc: BaseException) -> bool:
    """A lost or refused database connection, from Django or from psycopg's own
    LISTEN connection."""
    if isinstance(exc, outage.DB_ERRORS):
        return True
    try:
        import psycopg
    except ImportError:
        return False
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)

class Relay:
    def __init__(self) -> None:
        self.group = f"hadash-events-{os.getpid()}-{id(self)}"
        self.last = 0
        self.holes: dict[int, float] = {}
        self.ready = asyncio.Event()
        self.wake = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self.run())

    @property
    def watermark(self) -> int:
        return (min(self.holes) - 1) if self.holes else self.last

    async def run(self) -> None:
        from channels.layers import get_channel_layer

        self.layer = get_channel_layer()
        self.last = await sync_to_async(max_id, thread_sensitive=False)()
        self.ready.set()
        vendor = connection.vendor
        while True:
            try:
                if vendor == "postgresql":
                    await self.listen_pg()
                else:
                    while True:
                        await self.read()
                        outage.ok()
                        await asyncio.sleep(POLL_SQLITE)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_database_error(exc):  # an outage: one line per process, then quiet
                    outage.failed("live event relay", exc, drop_connection=False)
                else:
                    log.exception("event relay failed; retrying in 1 s")
                await asyncio.sleep(1.0)

    async def listen_pg(self) -> None:
        import psycopg

        s = connection.settings_dict
        # OPTIONS too: with several hosts (PostgreSQL HA), target_session_attrs keeps
        # LISTEN on the primary — a standby cannot LISTEN, and notifies come from it.
        options = {k: v for k, v in (s.get("OPTIONS") or {}).items() if k not in (
            "pool", "isolation_level", "assume_role", "server_side_binding",
            "cursor_factory", "prepare_threshold", "context")}
        conninfo = psycopg.conninfo.make_conninfo(
            dbname=s["NAME"], user=s["USER"] or None, password=s["PASSWORD"] or None,
            host=s["HOST"] or None, port=s["PORT"] or None, **options,
        )
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
            await conn.execute(f"LISTEN {CHANNEL}")
            await self.read()
            outage.ok()
            gen = conn.notifies(timeout=POLL_PG)
            while True:
                async for _ in gen:
                    break  # one wake-up is enough: read() takes all that committed
                await self.read()
                gen = conn.notifies(timeout=POLL_PG)

    async def read(self) -> None:
        rows = await sync_to_async(fetch, thread_sensitive=False)(self.last, self.holes)
        now = time.monotonic()
        for r in rows:
            self.holes.pop(r["id"], None)
        fresh = [r["id"] for r in rows if r["id"] > self.last]
        if fresh:
            have = set(fresh)
            for i in range(self.last + 1, max(fresh)):
                if i not in have:
                    self.holes.setdefault(i, now)
            self.last = max(fresh)
        for i, seen in list(self.holes.items()):
            if now - seen > HOLE_TTL:
                del self.holes[i]  # rolled back, or never coming
        if rows:
            await self.layer.group_send(self.group, {
                "type": "events.batch", "events": rows, "watermark": self.watermark,
            })


_relays: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


async def relay() -> Relay:
    """This process's relay (one per event loop), started on first use."""
    loop = asyncio.get_running_loop()
    r = _relays.get(loop)
    if r is None or r.task.done():
        r = _relays[loop] = Relay()
    await r.ready.wait()
    return r


async def stop_relay() -> None:
    """Stop this event loop's relay (closing its LISTEN connection). For tests and
    orderly shutdowns; daphne simply lets it die with the process."""
    loop = asyncio.get_running_loop()
    r = _relays.pop(loop, None)
    if r is not None and not r.task.done():
        r.task.cancel()
        await asyncio.gather(r.task, return_exceptions=True)
