"""Clocks. Every engine step takes its time from a clock, so tests and the scenario
runner drive the real engine with virtual time."""

from __future__ import annotations

import datetime as dt

from django.utils import timezone


class SystemClock:
    def now(self) -> dt.datetime:
        return timezone.now()


class VirtualClock:
    """Starts at ``epoch`` and moves only when told to."""

    EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    def __init__(self, epoch: dt.datetime | None = None):
        self.epoch = epoch or self.EPOCH
        self.t = 0.0

    def now(self) -> dt.datetime:
        return self.epoch + dt.timedelta(seconds=self.t)

    def advance(self, seconds: float) -> None:
        self.t += seconds

    def set(self, t: float) -> None:
        self.t = t


def not_before(column: str, at: dt.datetime):
    """An UPDATE value: timestamp ``column`` moved forward to ``at``, never back (NULL
    becomes ``at``). Reports are applied with their arrival time, which may be
    earlier than what a later report or a health check already wrote."""
    from django.db.models import DateTimeField, F, Value
    from django.db.models.functions import Coalesce, Greatest

    value = Value(at, output_field=DateTimeField())
    return Greatest(Coalesce(F(column), value), value)
