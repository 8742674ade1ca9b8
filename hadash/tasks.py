"""django-q2 task entry points (see hadash.ha.runtime for the design)."""

from __future__ import annotations

import logging

from django.utils import timezone

log = logging.getLogger("hadash.tasks")

# Two one-minute schedules half a minute apart: django-q's scheduler wakes every 30 s
# in every cluster, so the loops are topped up about every 30 s — a dead cluster's
# sweeper is replaced well within a minute even when no standby loop survived it.
ENSURE_SCHEDULES = ("hadash: keep the engine loops running (:00)",
                    "hadash: keep the engine loops running (:30)")
ENGINE_LOOP = "hadash.tasks.engine_loop"


def engine_loop() -> str:
    """One engine loop; before it ends it enqueues its successor."""
    from hadash.ha.runtime import EngineLoop

    return EngineLoop(successor=spawn_loop).run()


def spawn_loop(n: int = 1) -> None:
    from django_q.tasks import async_task

    for _ in range(n):
        async_task(ENGINE_LOOP, q_options={"task_name": "hadash engine loop"})


def ensure_engine() -> str:
    """Every minute: alert on a stalled sweeper, top the loops up to the target."""
    from hadash.ha.runtime import TARGET_LOOPS, check_stall, reap_lost_loops, status

    stalled = check_stall()
    reap_lost_loops()
    st = status()
    missing = max(0, TARGET_LOOPS - st["alive_loops"])
    if missing:
        spawn_loop(missing)
    return f"alive {st['alive_loops']}, spawned {missing}, stalled {stalled}"


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
