"""Wake the HA workers as soon as work is scheduled in another process.

HA items are mostly scheduled outside the engine: a VM that crashes is reported by its
agent, and the web process that ingests the report schedules the item (R9). Idle
workers look for due work once a second (the engine loop's tick), so such an item
used to wait up to a second before anyone claimed it. On PostgreSQL every committed
event already NOTIFYs ``hadash_events`` (migration 0005, for the live dashboards), and
every scheduled item comes with an event; this thread LISTENs there and, when due work
is waiting, wakes the workers at once. At most one look per ``MIN_GAP`` (a burst of
events costs one query, not one each), and none while no worker of this process waits
for work (``wanted``): a busy worker claims its next item itself when it finishes one
(issue 12: while a rack restarted, every event NOTIFYs and the look cost a query every
20 ms, a tenth of the engine's CPU, to wake nobody). Elsewhere (SQLite) it does
nothing: the tick stays.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from django.db import connection
from django.utils import timezone

from hadash import outage

log = logging.getLogger("hadash.runtime")

CHANNEL = "hadash_events"
MIN_GAP = 0.02  # seconds between two looks for due work


def _conninfo() -> str:
    import psycopg

    s = connection.settings_dict
    return psycopg.conninfo.make_conninfo(
        dbname=s["NAME"], user=s["USER"] or None, password=s["PASSWORD"] or None,
        host=s["HOST"] or None, port=s["PORT"] or None,
    )


def work_due() -> bool:
    from .work import due_items

    return due_items(timezone.now()).exists()


_current: dict = {}  # this process's listener: its thread and whom it wakes
_current_lock = threading.Lock()


def start(stopping: threading.Event, wake: Callable[[], None], name: str,
          wanted: Callable[[], bool] = lambda: True) -> None:
    """One listener per process, waking the latest engine loop's workers (a loop that
    failed and was restarted hands its listener to the new one)."""
    with _current_lock:
        _current["wake"], _current["wanted"] = wake, wanted
        thread = _current.get("thread")
        if thread is not None and thread.is_alive() and not _current["stopping"].is_set():
            return
        thread = threading.Thread(target=run, args=(stopping, lambda: _current["wake"](),
                                                    lambda: _current["wanted"]()),
                                  name=name, daemon=True)
        _current.update(thread=thread, stopping=stopping)
        thread.start()


def run(stopping: threading.Event, wake: Callable[[], None],
        wanted: Callable[[], bool] = lambda: True) -> None:
    """Until ``stopping``: LISTEN, and call ``wake`` when events committed, someone
    waits for work (``wanted``) and HA work is due. Reconnects after a lost connection
    (quietly: the engine loop reports outages)."""
    if connection.vendor != "postgresql":
        return
    import psycopg

    try:
        while not stopping.is_set():
            try:
                with psycopg.connect(_conninfo(), autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    listen(conn, stopping, wake, wanted)
            except (psycopg.Error, *outage.DB_ERRORS) as exc:
                log.debug("HA wake-up listener: %s; again in 1 s", exc)
                connection.close()
                stopping.wait(1.0)
            except Exception:
                log.exception("HA wake-up listener failed; again in 1 s")
                stopping.wait(1.0)
    finally:
        connection.close()


def listen(conn, stopping: threading.Event, wake: Callable[[], None],
           wanted: Callable[[], bool] = lambda: True) -> None:
    last = 0.0
    while not stopping.is_set():
        got = False
        for _ in conn.notifies(timeout=1.0, stop_after=1):
            got = True
        if not got:
            continue
        gap = MIN_GAP - (time.monotonic() - last)
        if gap > 0:
            time.sleep(gap)
        # Everything that arrived meanwhile is covered by this one look.
        for _ in conn.notifies(timeout=0.0):
            pass
        last = time.monotonic()
        if wanted() and work_due():
            wake()
