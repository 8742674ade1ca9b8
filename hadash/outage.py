"""Database outages, as the engine lives through them (issue 8 part 7).

A PostgreSQL restart or a terminated backend breaks every connection a process holds:
each engine thread (loop, HA workers, investigators) fails its next query with an
OperationalError or InterfaceError. What an operator should see is one warning line
per process and, once the database answers again, one line saying so — not a
traceback per thread and second. `failed()` closes the calling thread's connection
(Django opens a new one on the next query) and logs the first failure of an outage;
`ok()` ends the outage.
"""

from __future__ import annotations

import logging
import threading
import time

from django.db import InterfaceError, OperationalError, connection

log = logging.getLogger("hadash.runtime")

# What a lost or refused connection raises (also deadlocks, serialisation failures,
# cancelled statements and SQLite's "database is locked" — all of which are
# likewise worth a reconnect and another try, never a traceback per thread).
DB_ERRORS = (OperationalError, InterfaceError)

# An outage ends when a round trip succeeds and no thread has failed for this long:
# threads notice a broken connection one after the other (a worker in an agent call
# notices seconds later), and those stragglers belong to the same outage.
QUIET = 5.0

_lock = threading.Lock()
_since: float | None = None
_last: float = 0.0


def brief(exc: BaseException) -> str:
    """The exception as one short line (driver messages span several)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def failed(where: str, exc: BaseException, *, drop_connection: bool = True) -> None:
    """A database error in this thread: drop its connection (unless the caller does
    that itself, or the thread holds none); warn once per outage."""
    global _since, _last
    with _lock:
        first = _since is None
        _last = time.monotonic()
        if first:
            _since = _last
    if first:
        log.warning("database unavailable (%s, in %s); reconnecting", brief(exc), where)
    else:
        log.debug("database still unavailable (%s, in %s)", brief(exc), where)
    if drop_connection:
        reconnect()


def ok() -> None:
    """A database round trip succeeded: an outage under way is over once no thread
    has failed for QUIET seconds."""
    global _since
    if _since is None:
        return
    with _lock:
        if _since is None or time.monotonic() - _last < QUIET:
            return
        since, _since = _since, None
    log.info("database reachable again (unavailable for %.1f s)", _last - since)


def reconnect() -> None:
    """Close this thread's connection; the next query opens a fresh one."""
    try:
        connection.close()
    except Exception:  # a broken connection may fail even to close: it is gone anyway
        log.debug("closing a broken database connection failed", exc_info=True)
        connection.connection = None


def under_way() -> bool:
    return _since is not None


class OneLine(logging.Filter):
    """For django-q's logger in the engine processes: a database error it logs with a
    traceback (its pusher polls the queue table every 0.2 s, its scheduler every 30 s)
    becomes one line naming the error, as hadash's own threads report it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, DB_ERRORS):
            record.msg = f"{record.getMessage()}: {brief(exc)}"
            record.args = None
            record.exc_info = record.exc_text = None
        return True
