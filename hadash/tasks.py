"""django-q2 task entry points (see hadash.ha.runtime for the design)."""

from __future__ import annotations

import logging

from django.utils import timezone

log = logging.getLogger("hadash.tasks")

ENSURE_SCHEDULE = "hadash: keep the engine loops running"
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
    from hadash.ha.runtime import TARGET_LOOPS, check_stall, status

    stalled = check_stall()
    st = status()
    missing = max(0, TARGET_LOOPS - st["alive_loops"])
    if missing:
        spawn_loop(missing)
    return f"alive {st['alive_loops']}, spawned {missing}, stalled {stalled}"


def register_schedules() -> None:
    """Idempotent: the one schedule the engine needs (update_or_create by name)."""
    from django_q.models import Schedule

    Schedule.objects.update_or_create(
        name=ENSURE_SCHEDULE,
        defaults={
            "func": "hadash.tasks.ensure_engine",
            "schedule_type": Schedule.MINUTES,
            "minutes": 1,
            "repeats": -1,
        },
        create_defaults={
            "func": "hadash.tasks.ensure_engine",
            "schedule_type": Schedule.MINUTES,
            "minutes": 1,
            "repeats": -1,
            "next_run": timezone.now(),
        },
    )
