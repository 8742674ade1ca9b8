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
