"""django-q2 task entry points (see hadash.ha.runtime for the design).

The engine loops are not tasks: each qcluster process runs its own
(hadash.ha.runtime.host_resident_loop). The only task is the stall check, twice a minute.
"""

from __future__ import annotations

import logging

from django.utils import timezone

log = logging.getLogger("hadash.tasks")

# Two one-minute schedules half a minute apart: django-q's scheduler wakes every 30 s
# in every cluster, so a stalled sweeper is reported within about half a minute.
ENSURE_SCHEDULES = ("hadash: keep the engine loops running (:00)",
                    "hadash: keep the engine loops running (:30)")


def engine_loop() -> str:
    """Engine loops used to be queued tasks; one still queued from before an upgrade
    ends at once (every engine process runs its own loop now)."""
    return "not needed: every engine process runs its own engine loop"


def ensure_engine() -> str:
    """Twice a minute: alert on a stalled sweeper (loops that stopped heartbeating are
    reaped by the sweeper)."""
    from hadash.ha.runtime import check_stall, status

    stalled = check_stall()
    st = status()
    return f"alive {st['alive_loops']} of {st['target_loops']}, stalled {stalled}"


def register_schedules() -> None:
    """Idempotent: the schedules the engine needs (update_or_create by name)."""
    import datetime as dt

    from django_q.models import Schedule

    for offset, name in enumerate(ENSURE_SCHEDULES):
        fields = {"func": "hadash.tasks.ensure_engine", "schedule_type": Schedule.MINUTES,
                  "minutes": 1, "repeats": -1}
        Schedule.objects.update_or_create(
            name=name, defaults=fields,
            create_defaults={**fields,
                             "next_run": timezone.now() + dt.timedelta(seconds=30 * offset)},
        )
