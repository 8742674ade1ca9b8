"""The database work of the agent protocol's HTTP requests (connect, ping, disconnect)
and of AgentGate's token lookup, under ASGI: a few threads of their own, each keeping
its database connection between requests (issue 12).

Under Django's ASGI handler a sync view runs in a new thread per request (asgiref's
ThreadSensitiveContext), so every request opened — and PostgreSQL forked — a connection
of its own (CONN_MAX_AGE cannot help: the thread is never seen again), and AgentGate's
lookup (channels' database_sync_to_async) opened and closed one more, in the one thread
all such calls share. A fleet connecting at once (enrolment, or every host after a
restart of the web process) paid that per request. Here the views are async and hand
their database work to ``THREADS`` long-lived threads: ``THREADS`` connections per web
process, opened once.

A call that fails with anything but the protocol's own refusals drops its thread's
connection (it may be broken: PostgreSQL restarted, a network cut); the next call on
that thread opens a new one. A connection idle for more than ``CHECK_AFTER`` is checked
before use (as Django's CONN_HEALTH_CHECKS does), so a restart of PostgreSQL between
two requests costs neither an error. Each call runs in its own transactions (autocommit
between them), as a request's view did.

Outside ASGI — Django's test client, which calls a view from a thread holding the
test's connection and transaction — the work runs in that calling thread instead
(:func:`run_for`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from asgiref.sync import sync_to_async
from django.db import connection

THREADS = 4  # connections per web process; a connect holds one for a few ms
# A connection idle this long is checked (SELECT 1) before it is used: a PostgreSQL
# restarted meanwhile costs no request an error. Within a burst nothing is checked.
CHECK_AFTER = 1.0

_local = threading.local()

_executor: ThreadPoolExecutor | None = None
_lock = threading.Lock()
# Exceptions that are answers, not failures: the connection stays.
_expected: tuple[type[BaseException], ...] = ()


def expected(*kinds: type[BaseException]) -> None:
    """Register exception types a call may raise as a normal answer (a 4xx)."""
    global _expected
    _expected = tuple({*_expected, *kinds})


def executor() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=THREADS,
                                           thread_name_prefix="hadash-agent-db")
        return _executor


def _call(fn: Callable, args: tuple, kwargs: dict) -> Any:
    if connection.connection is not None and \
            time.monotonic() - getattr(_local, "used", 0.0) > CHECK_AFTER \
            and not connection.is_usable():
        connection.close()  # opened again by the call's first query
    try:
        return fn(*args, **kwargs)
    except BaseException as exc:
        if not isinstance(exc, _expected) or connection.needs_rollback \
                or connection.in_atomic_block:
            connection.close()  # this thread's connection; the next call reconnects
        raise
    finally:
        _local.used = time.monotonic()


def close_all(timeout: float = 10.0) -> None:
    """Close every pool thread's connection (tests, before their database goes): one
    task per thread, each waiting for the others so that no thread takes two."""
    with _lock:
        pool = _executor
    if pool is None:
        return
    barrier = threading.Barrier(THREADS)

    def close() -> None:
        try:
            barrier.wait(timeout)
        finally:
            connection.close()

    for future in [pool.submit(close) for _ in range(THREADS)]:
        future.result(timeout + 5)


async def run(fn: Callable, *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` in one of the pool's threads, on its connection."""
    return await sync_to_async(_call, thread_sensitive=False, executor=executor())(
        fn, args, kwargs)


async def run_here(fn: Callable, *args, **kwargs) -> Any:
    """``fn`` in the thread the async code was called from (Django's test client)."""
    return await sync_to_async(fn, thread_sensitive=True)(*args, **kwargs)


def run_for(request) -> Callable:
    """:func:`run` for a request served under ASGI, else :func:`run_here`."""
    from django.core.handlers.asgi import ASGIRequest

    return run if isinstance(request, ASGIRequest) else run_here
