"""Durable counters (SPEC R21): ``inc(name, n=1, **labels)``.

Other modules count what happened, in the transaction of what they count, so a rolled
back change is not counted and every process's /metrics reads the same totals::

    from metrics.counters import inc
    inc("fences", outcome="ok")

One statement per call: ``INSERT … ON CONFLICT (name, labels, shard) DO UPDATE SET
value = value + n`` (PostgreSQL and SQLite ≥ 3.24), race-safe without a read. The row
is picked by the thread's native id (``shard``), so concurrent processes — and the HA
worker threads of one engine process — counting the same thing do not wait on each
other's row lock until commit (one shard per process made 50 workers restarting a
rack queue on one row: issue 12); /metrics sums the shards.

Known names (exposed with the ``hadash_`` prefix and ``_total`` suffix):

===================  ===========================  ==================================
name                 labels                       counted by
===================  ===========================  ==================================
``fences``           outcome: ``ok`` | ``failed``  the engine, per fence attempt
``restarts``         outcome: ``ok`` | ``failed``  the engine, per HA restart attempt
``pings_ingested``   (none)                       ingestion, n = pings per batch
``notifications``    outcome: ``sent`` |          the notification sender, per
                     ``failed`` | ``retried``      delivery attempt
===================  ===========================  ==================================

A name not in KNOWN is refused (ValueError), so a typo fails a test instead of
silently exporting a metric nobody reads. Label values must not contain ``,`` or ``=``.
"""

from __future__ import annotations

import re
import threading

from django.db import connection

# name -> (label names, help text). /metrics exposes every known name, with zero
# samples for the label values below when nothing has been counted yet.
KNOWN: dict[str, tuple[tuple[str, ...], str]] = {
    "fences": (("outcome",), "Fence attempts by outcome."),
    "restarts": (("outcome",), "HA restart attempts by outcome."),
    "pings_ingested": ((), "Agent pings ingested."),
    "notifications": (("outcome",), "Notification delivery attempts by outcome."),
}
# Label values always present in the output (0 until counted).
KNOWN_VALUES: dict[str, dict[str, tuple[str, ...]]] = {
    "fences": {"outcome": ("ok", "failed")},
    "restarts": {"outcome": ("ok", "failed")},
    "notifications": {"outcome": ("sent", "failed", "retried")},
}
SHARDS = 32
_LABEL_VALUE = re.compile(r"^[^,=]*$")

_SQL = (
    "INSERT INTO metric_counter (name, labels, shard, value) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (name, labels, shard) DO UPDATE SET value = metric_counter.value + "
    "excluded.value"
)


def label_string(labels: dict[str, object]) -> str:
    """The canonical stored form: ``k=v`` pairs sorted by key, comma-separated."""
    return ",".join(f"{k}={labels[k]}" for k in sorted(labels))


def parse_labels(text: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in text.split(",")) if text else {}


def inc(name: str, n: int = 1, **labels) -> None:
    """Add ``n`` to the counter ``name`` with ``labels``, in the caller's transaction."""
    known = KNOWN.get(name)
    if known is None:
        raise ValueError(f"unknown counter {name!r}: add it to metrics.counters.KNOWN")
    if set(labels) != set(known[0]):
        raise ValueError(f"counter {name!r} takes labels {list(known[0])}, "
                         f"got {sorted(labels)}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"counter {name!r}: n must be a whole number ≥ 0, got {n!r}")
    for key, value in labels.items():
        if not _LABEL_VALUE.match(str(value)):
            raise ValueError(f"counter {name!r}: label {key}={value!r} contains ',' or '='")
    if n == 0:
        return
    with connection.cursor() as cursor:
        cursor.execute(_SQL, [name, label_string(labels),
                              threading.get_native_id() % SHARDS, n])


def totals() -> dict[tuple[str, str], int]:
    """{(name, labels string): value summed over shards}."""
    from django.db.models import Sum

    from .models import Counter

    return {
        (row["name"], row["labels"]): row["total"]
        for row in Counter.objects.values("name", "labels").annotate(total=Sum("value"))
    }
