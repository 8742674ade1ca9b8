"""HA work (R10–R13, CloudStack's HighAvailabilityManagerImpl): scheduling, claiming
and processing of op_ha_work items.

Every item is both history and work queue. Workers claim due items with a
conditional UPDATE under a row lock that skips locked rows, never more than
`ha.workers` at once across the installation; all agent and BMC I/O happens outside
database transactions; every step change is committed together with its event.
Processing a claimed item (`hadash.ha.worker.worker_step`) dispatches to
`hadash.ha.handlers`, which build on this module; this module never imports them.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import time

from django.db import connection, transaction
from django.db.models import Q

from hadash import alerts, incidents, outage
from hadash.choices import FINAL_STEPS, Reason, Severity, Step, Subject, WorkType
from hadash.events import record_event
from hadash.models import HaWork, Lease
from hosts.choices import HostStatus
from vms.choices import PowerState, VmState
from vms.models import VMInstance

log = logging.getLogger("hadash.work")

# R11: a worker that dies leaves its item taken; after this lease another may retake it.
WORK_LEASE = dt.timedelta(minutes=5)
MAX_BACKOFF = dt.timedelta(hours=1)
CLAIM_LOCK = "ha.claim"

__all__ = ["HaWork", "schedule_restart", "schedule_restart_for_vms_on_host"]


# --- scheduling ----------------------------------------------------------------------
# Inserting items is a model-level operation (hadash.models.HaWorkManager), so the
# domain (hosts/, vms/) schedules work without importing the engine; the engine's
# callers keep these names.

schedule_restart = HaWork.objects.schedule_restart
schedule_restart_for_vms_on_host = HaWork.objects.schedule_restart_for_vms_on_host
schedule_force_stop = HaWork.objects.schedule_force_stop


def schedule_stop(vm: VMInstance, *, now, by: str = "") -> HaWork | None:
    return HaWork.objects.schedule(
        vm, type=WorkType.STOP, reason=Reason.OPERATOR, step=Step.SCHEDULED, now=now,
        message=f"Stop of VM {vm.name} requested{' by ' + by if by else ''}",
    )


def schedule_migration(vm: VMInstance, *, now) -> HaWork | None:
    return HaWork.objects.schedule(
        vm, type=WorkType.MIGRATION, reason=Reason.HOST_MAINTENANCE, step=Step.SCHEDULED,
        now=now,
    )


# --- claiming ---------------------------------------------------------------------------

def due_items(now):
    """R11: due, unfinished, not taken (or with a lapsed lease); system VMs first,
    then by priority, then oldest first."""
    return (
        HaWork.objects.exclude(step__in=FINAL_STEPS)
        .filter(time_to_try__lte=now)
        .filter(Q(taken__isnull=True) | Q(taken__lt=now - WORK_LEASE))
        .order_by("rank", "created", "id")
    )


def in_flight(now) -> int:
    return (
        HaWork.objects.exclude(step__in=FINAL_STEPS)
        .filter(taken__isnull=False, taken__gte=now - WORK_LEASE)
        .count()
    )


def claim(engine, cfg) -> HaWork | None:
    """Take one due item, or None (nothing due, or ha.workers items already in
    flight across the installation)."""
    items = claim_many(engine, cfg, 1)
    return items[0] if items else None


def claim_many(engine, cfg, n: int) -> list[HaWork]:
    """Take up to ``n`` due items in one claim — the next ``n`` in R11's order, as
    many as ha.workers still allows across the installation — all taken by
    ``engine.worker_id``; a worker pool hands the others to its waiting threads
    (`hand_over`). Empty when nothing is due or ha.workers items are in flight."""
    now = engine.now()
    if not due_items(now).exists():
        return []  # the common case, without taking any lock
    with transaction.atomic():
        # Claims are serialised on one lease row, so "count in flight, then take"
        # cannot overshoot ha.workers between two processes.
        lock_claims()
        if connection.vendor == "postgresql":
            return _claim_pg(now, engine.worker_id, cfg["ha.workers"], n)
        room = cfg["ha.workers"] - in_flight(now)
        items = list(due_items(now).select_for_update(skip_locked=True, of=("self",))
                     [:max(0, min(n, room))])
        taken = []
        for item in items:
            if HaWork.objects.filter(pk=item.pk, taken=item.taken, updated=item.updated) \
                    .update(taken=now, taken_by=engine.worker_id):
                item.taken, item.taken_by = now, engine.worker_id
                taken.append(item)
        return taken


def hand_over(item: HaWork, worker_id: str) -> bool:
    """Take over ``item``, claimed for us by another worker of our pool (`claim_many`):
    it becomes ours (``taken_by``) unless it is no longer the claimer's — released
    meanwhile, e.g. after the claimer lost its connection (`release_held_by`)."""
    if not HaWork.objects.filter(pk=item.pk, taken_by=item.taken_by, taken=item.taken) \
            .exclude(step__in=FINAL_STEPS).update(taken_by=worker_id):
        return False
    item.taken_by = worker_id
    return True


@functools.cache
def _claim_sql() -> tuple[str, list[str]]:
    fields = list(HaWork._meta.concrete_fields)
    final = ", ".join(f"'{s}'" for s in FINAL_STEPS)  # our own constants
    return f"""
        UPDATE op_ha_work SET taken = %(now)s, taken_by = %(by)s
         WHERE id IN (
            SELECT id FROM op_ha_work
             WHERE step NOT IN ({final}) AND time_to_try <= %(now)s
               AND (taken IS NULL OR taken < %(lapsed)s)
             ORDER BY rank, created, id
             LIMIT GREATEST(0, LEAST(%(n)s, %(workers)s - (
                SELECT count(*) FROM op_ha_work
                 WHERE step NOT IN ({final}) AND taken IS NOT NULL
                   AND taken >= %(lapsed)s)))
             FOR UPDATE SKIP LOCKED)
        RETURNING {", ".join(f.column for f in fields)}""", [f.attname for f in fields]


def _claim_pg(now, worker_id: str, workers: int, n: int) -> list[HaWork]:
    """The count, the pick and the take as one statement after the claim lock (issue
    12: each round trip under the lock cost a GIL hand-over with twenty workers awake,
    ≈ 30 ms a claim, and a failed host's claims queue behind each other). It runs after
    the lock statement, so under READ COMMITTED its snapshot sees every claim committed
    before ours (R11: never more than ``workers`` in flight)."""
    sql, names = _claim_sql()
    with connection.cursor() as cursor:
        cursor.execute(sql, {"now": now, "by": worker_id, "lapsed": now - WORK_LEASE,
                             "workers": workers, "n": n})
        rows = cursor.fetchall()
    items = [HaWork.from_db(connection.alias, names, row) for row in rows]
    items.sort(key=lambda i: (i.rank, i.created, i.pk))  # R11's order
    return items


def lock_claims() -> None:
    """Take the installation-wide claim lock (a row lock on PostgreSQL; SQLite's
    IMMEDIATE transactions already serialise writers). The row is seeded by a
    migration; created here if someone deleted it."""
    if Lease.objects.select_for_update().filter(name=CLAIM_LOCK).first() is None:
        Lease.objects.get_or_create(name=CLAIM_LOCK)
        Lease.objects.select_for_update().get(name=CLAIM_LOCK)


class LostItem(Exception):
    """The item was retaken by another worker (our lease lapsed): stop touching it."""


def _update(item: HaWork, now, **changes) -> None:
    """Change our item, only while we still hold it."""
    if not _updated(item, now, **changes):
        raise LostItem(item.pk)


def _updated(item: HaWork, now, **changes) -> bool:
    """`_update`, returning False (nothing written) when the item is no longer ours."""
    changes.setdefault("updated", now)
    n = HaWork.objects.filter(pk=item.pk, taken_by=item.taken_by, taken=item.taken).update(
        **changes
    )
    if not n:
        return False
    for k, v in changes.items():
        setattr(item, k, v)
    return True


# set_step, retry and mark_vm (and VMInstance.transition) mostly run inside their
# callers' transactions, and open no savepoint there (savepoint=False): a savepoint is
# two more round trips (SAVEPOINT, RELEASE), nine of them an HA restart (issue 12).
# Without one, an exception leaving the block dooms the caller's transaction: so
# set_step's and retry's LostItem — which callers may catch — is raised once the block
# is left, having written nothing; mark_vm's (the VM changed, the item no longer ours)
# dooms it on purpose — the VM's change must not stay without the item's.

def set_step(item: HaWork, step: str, *, now, message: str = "",
             severity: str | None = None, vm: VMInstance | None = None, **changes) -> None:
    """Move the item to ``step`` with its event, in one transaction. An item that
    moves on no longer waits (R17: ``waiting`` cleared)."""
    with transaction.atomic(savepoint=False):
        old = item.step
        if item.waiting and "waiting" not in changes:
            changes["waiting"] = ""
        lost = not _updated(item, now, step=step, **changes)
        if not lost and (old != step or message):
            record_event(
                Subject.WORK, item, name=item.instance.name, event="WorkStep", field="step",
                old=old, new=step, reason=item.reason, severity=severity, now=now,
                related_vm=item.instance, related_host=item.host,
                incident=item.incident_id,
                message=message or f"{item.type} work #{item.pk} for {item.instance.name}: "
                                   f"{old} → {step}",
            )
    if lost:
        raise LostItem(item.pk)


# R19: an item that ends in Error outside any incident raises one alert per (kind, VM),
# resolved when a later item for the VM finishes Done.
ERROR_ALERT_KINDS = {
    WorkType.HA: "HaGaveUp",
    WorkType.MIGRATION: "MigrationFailed",
    WorkType.STOP: "StopFailed",
    WorkType.CHECK_STOP: "StopFailed",
    WorkType.FORCE_STOP: "ForceStopFailed",
    WorkType.DESTROY: "DestroyFailed",
}


def finish(item: HaWork, step: str, *, now, message: str, settled: bool = False) -> None:
    """End the item (Done, Cancelled, Error) with its event; its incident learns what
    became of the VM (R18; ``settled``: the caller told it already), and work alerts
    open or resolve (R19) — one transaction."""
    with transaction.atomic():
        set_step(item, step, now=now, message=message, taken=None, taken_by="",
                 severity=Severity.CRITICAL if step == Step.ERROR else None)
        if item.type == WorkType.HA and not settled:
            incidents.item_ended(item, step, now=now, message=message)
        vm = item.instance
        if step == Step.ERROR and not item.incident_id:
            alerts.open_alert(
                ERROR_ALERT_KINDS.get(item.type, "WorkFailed"), Subject.VM, vm.name, now=now,
                vm=vm, host=item.host, cluster=vm.cluster or "", severity=Severity.CRITICAL,
                title=f"{item.type} work for {vm.name} gave up", message=message)
        elif step == Step.DONE:
            for kind in open_work_alerts(vm.name):
                alerts.resolve_alert(
                    kind, Subject.VM, vm.name, now=now,
                    message=f"{item.type} work #{item.pk} for {vm.name} done")


def open_work_alerts(vm_name: str) -> list[str]:
    """Kinds of the VM's open work alerts (one query)."""
    from hadash.choices import AlertState
    from hadash.models import Alert

    return list(Alert.objects.filter(
        subject=Subject.VM, subject_name=vm_name, state=AlertState.OPEN,
        kind__in=set(ERROR_ALERT_KINDS.values())).values_list("kind", flat=True))


def retry(item: HaWork, *, now, after: float, message: str, tried: int | None = None,
          step: str | None = None, waiting: str = "") -> None:
    """Release the item to be tried again ``after`` seconds from now; ``waiting`` is
    why (R17, a hadash.choices.WaitCause; ``message`` in the operator's words)."""
    changes = dict(taken=None, taken_by="", last_error=message[:2000],
                   time_to_try=now + dt.timedelta(seconds=after), waiting=waiting)
    if tried is not None:
        changes["tried"] = tried
    with transaction.atomic(savepoint=False):
        old = item.step
        lost = not _updated(item, now, step=step or item.step, **changes)
        if not lost:
            record_event(
                Subject.WORK, item, name=item.instance.name, event="WorkRetry", field="step",
                old=old, new=item.step, reason=item.reason, now=now,
                severity=Severity.WARNING if waiting else None,
                related_vm=item.instance, related_host=item.host,
                incident=item.incident_id,
                message=f"{item.type} work #{item.pk} for {item.instance.name}: {message}; "
                        f"next try in {int(after)} s",
            )
    if lost:
        raise LostItem(item.pk)


def wait_quietly(item: HaWork, *, now, after: float, waiting: str, message: str) -> None:
    """Like `retry`, for an item held by a condition that lasts (R26: HA disarmed):
    the first wait is an event, later looks at the same condition are not (one
    WorkRetry event per hold, not one a minute per VM)."""
    if item.waiting != waiting:
        retry(item, now=now, after=after, message=message, waiting=waiting)
        return
    _update(item, now, taken=None, taken_by="", last_error=message[:2000],
            time_to_try=now + dt.timedelta(seconds=after))


def refresh_snapshot(item: HaWork, vm: VMInstance, now) -> None:
    """R12.1: the engine's own VM changes refresh the item's snapshot."""
    _update(item, now, state=vm.state, update_count=vm.update_count)


def release_claim(claim, *, now, after: float, message: str) -> bool:
    """Give a claimed item back to be tried again ``after`` seconds from now, from
    its state in the database (what the failed step committed, nothing more).
    False when it is no longer ours (finished, or retaken after our lease)."""
    pk, taken_by, taken = claim
    with transaction.atomic():
        item = (HaWork.objects.select_related("instance", "host")
                .filter(pk=pk, taken_by=taken_by, taken=taken).first())
        if item is None:
            return False
        retry(item, now=now, after=after, message=message)
    return True


# How long a worker keeps trying to give back an item after a database error
# (doubling waits up to RELEASE_WAIT_MAX): well within its lease, so the item is
# retaken within seconds of the database answering again, not when WORK_LEASE lapses.
RELEASE_PATIENCE = 120.0
RELEASE_WAIT_MAX = 5.0


def release_after_db_error(engine, claim, exc) -> bool:
    """R11 after a broken connection (issue 8 part 7): reconnect and release the
    item to be tried again at once. Whatever its step committed stands; the retry
    resumes from there (a resumed start first asks whether the VM already runs)."""
    outage.failed(f"HA work #{claim[0]}", exc)
    message = f"database connection lost ({outage.brief(exc)}); tried again at once"
    deadline = time.monotonic() + RELEASE_PATIENCE
    wait = 0.1
    while True:
        try:
            released = release_claim(claim, now=engine.now(), after=0, message=message)
        except outage.DB_ERRORS as again:
            outage.failed(f"releasing HA work #{claim[0]}", again)
            if time.monotonic() + wait > deadline:
                log.warning("work #%s stays taken until its lease lapses: the database did "
                            "not answer for %.0f s", claim[0], RELEASE_PATIENCE)
                return False
            time.sleep(wait)
            wait = min(wait * 2, RELEASE_WAIT_MAX)
            continue
        outage.ok()
        log.info("work #%s %s after a database error", claim[0],
                 "released" if released else "was no longer ours")
        return released


def release_held_by(worker_id: str, *, now, message: str) -> int:
    """Release every unfinished item taken by ``worker_id``: for a worker that holds
    none (it processes one item at a time) but whose claim may have committed while
    its connection broke. Items it claimed for other threads carry its id until they
    are handed over (`hand_over`); released, they are not. Returns how many were
    released."""
    held = list(HaWork.objects.unfinished().filter(taken_by=worker_id)
                .values_list("pk", "taken_by", "taken"))
    return sum(release_claim(c, now=now, after=0, message=message) for c in held)


def backoff_seconds(cfg, tried: int) -> float:
    """R12.5: restart.retry.interval × 2^(tried−1), capped at one hour."""
    base = cfg["restart.retry.interval"]
    return min(base * (2 ** max(tried - 1, 0)), MAX_BACKOFF.total_seconds())


def mark_vm(vm: VMInstance, item: HaWork, to: str, *, now, event: str, message: str,
            step: str | None = None, step_message: str = "", step_changes=None,
            **fields) -> bool:
    """Change the VM and refresh the item's snapshot in one transaction. ``step``
    (with ``step_message`` and ``step_changes``): the item moves on to it as well —
    `set_step`, its snapshot written by the same UPDATE (issue 12: one round trip
    fewer, twice on an HA restart's way to its start call)."""
    with transaction.atomic(savepoint=False):
        # R18: the VM's change is an event of the item's incident.
        if not vm.transition(to, now=now, event=event, message=message,
                             reason=item.reason, incident=item.incident_id, **fields):
            return False
        if step is None:
            refresh_snapshot(item, vm, now)
        else:
            set_step(item, step, now=now, message=step_message, state=vm.state,
                     update_count=vm.update_count, **(step_changes or {}))
    return True


def stopped_fields(vm: VMInstance) -> dict:
    return dict(host=None, last_host=vm.host or vm.last_host,
                power_state=PowerState.POWER_OFF)


def host_is_up(host) -> bool:
    return host is not None and host.status == HostStatus.UP


__all__ += ["claim", "backoff_seconds", "VmState"]
