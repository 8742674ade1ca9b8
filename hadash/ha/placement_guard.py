"""Placement with a reservation (R13 filters, R24 spread): the chosen host's row is
locked and its free capacity re-checked in the transaction that moves the VM to
Starting there, so two workers never fill the same room twice — and the next placement
of the batch (the host's other restarts) sees this one, as the VM occupies its target at
once. The ranking honours the VM's groups (R25): two members of an anti-affinity group
restarted at once never land on one host, as the second, once it holds the host's lock,
sees the first there. Why the host was chosen is recorded on the item (`HaWork.placement`, R24)."""

from __future__ import annotations

import datetime as dt

from django.db import transaction

from hadash.choices import Step, WorkType
from hosts.models import Host
from vms import placement
from vms.choices import VmState

from .work import mark_vm


def pick(vm, *, ha: bool, cfg, exclude=(), extra=None, moved=None):
    """The host to place ``vm`` on (R13, R24), or None. The returned host carries
    ``placement_reason`` — why it was chosen — for the item (`HaWork.placement`).
    ``extra``/``moved``: placements not in the database (vms.placement.pick_with_reason)."""
    host, why = placement.pick_with_reason(
        vm, ha=ha, ha_tag=cfg["ha.tag"], cluster=vm.cluster, exclude=tuple(exclude),
        extra=extra, moved=moved,
    )
    if host is not None:
        host.placement_reason = why
    return host


def no_room(vm, *, ha: bool, cfg, exclude=()) -> str:
    """Why no host takes the VM (R17 words): "needs 4 cpus / 8192 MB; best host
    kvm-07 has 2 cpus / 16384 MB free", or for an anti-affinity group (R25) "group
    db: every fitting host already runs a member (kvm-03, kvm-04)"."""
    return why_none(vm, ha=ha, cfg=cfg, exclude=exclude)[1]


def why_none(vm, *, ha: bool, cfg, exclude=()) -> tuple[str, str]:
    """(WaitCause code, words): `no-capacity` or `anti-affinity` (R17, R25)."""
    return placement.why_none(vm, ha=ha, ha_tag=cfg["ha.tag"], cluster=vm.cluster,
                              exclude=tuple(exclude))


# Rankings redone when other workers' reservations keep changing the best host; after
# that many, the locked host is taken if it still fits (never an endless loop).
RERANKS = 5
# How far down the ranking a worker looks for a host no other worker is placing on.
SKIP_AMONG = 8
# How many of the ranking's first hosts are read again under the lock.
RECHECK = 2 * SKIP_AMONG


# A host whose last ping is older than ping.interval and this much is late.
LATE_SLACK = 0.2


def late_among(rooms, *, now, cfg) -> frozenset[int]:
    """Of ``rooms`` (Up hosts, with their last ping), those that missed their last
    ping (not behind on ping yet: nobody investigates them, but they may be failing)."""
    cutoff = now - dt.timedelta(seconds=cfg["ping.interval"] + LATE_SLACK)
    return frozenset(r.id for r in rooms if r.last_ping is not None and r.last_ping < cutoff)


def reserve(vm, item, *, ha: bool, now, cfg, clock=None):
    """Pick a host and move the VM to Starting on it and the item to Restarting, in
    one transaction, recording why the host was chosen on the item. Returns the host,
    or None when no host has room. ``clock`` (the engine's): the HaStarting and
    Restarting events are stamped when the host is chosen, not when placement began
    (the rankings and the host's row lock take tens of milliseconds, more while a
    host's VMs are placed together; stamped at the start, that time showed as the
    start call's in the R18 phases).

    R24 with parallel workers: the best host is locked, then ranked again among the
    first `RECHECK` of the ranking — seeing every reservation committed meanwhile, e.g.
    another restart of the same failed host — and if the locked host is no longer the
    best, the new best is taken instead. So each placement of a batch sees the ones
    before it. Only the head of the ranking is read again (issue 12: the second full
    ranking of the cluster, ten workers at once, was most of a host failure's
    placement time); a host further down could only overtake the head if VMs left it
    in the milliseconds between the two reads."""
    tag = cfg["ha.tag"]
    groups = placement.groups_of(vm)
    # Under the lock the groups' rule is read again (R25: a member reserved meanwhile);
    # a VM in no group has none to read.
    again = None if groups else placement.NO_RULE
    ranking = placement.ranked(vm, ha=ha, ha_tag=tag, cluster=vm.cluster,
                               rule=placement.group_rule(vm, groups=groups))
    # Hosts late with their pings come last: when a rack fails its hosts go Down one
    # after the other, and a restart placed on a fellow host that is failing too would
    # fail and wait until that host is found Down (HaWorkManager.retry_starts_on).
    # Taken only when nothing else fits.
    late = late_among(ranking, now=now, cfg=cfg)
    found = [r for r in ranking if r.id not in late] or ranking
    if len(found) == len(ranking):
        late = frozenset()
    fitting = len(found)
    for attempt in range(RERANKS + 1):
        if not found:
            return None
        with transaction.atomic():
            locked, busy = lock_best(found)
            head = {r.id for r in found[:RECHECK]} | {locked.pk}
            # The groups' rule read again too (R25: a member reserved meanwhile).
            fresh = [r for r in placement.ranked(vm, ha=ha, ha_tag=tag, cluster=vm.cluster,
                                                 only=tuple(sorted(head)), rule=again)
                     if r.id not in late]
            mine = next((r for r in fresh if r.id == locked.pk), None)
            # Hosts ranked ahead of ours that other workers are placing on now count
            # as taken: they get a VM each before any of us could.
            ahead = [r.id for r in fresh[:fresh.index(mine)]] if mine is not None else []
            if mine is None or (set(ahead) - busy and attempt < RERANKS):
                # Filled or overtaken meanwhile: lock the best now (the whole cluster
                # ranked again once the head has no room left).
                found = fresh or [r for r in placement.ranked(
                    vm, ha=ha, ha_tag=tag, cluster=vm.cluster, rule=again)
                    if r.id not in late]
                fitting = len(found) if not fresh else fitting
                continue
            why = placement.explain(mine, vm.cpus, vm.memory_mb, fitting=fitting)
            now = clock() if clock is not None else now
            if not mark_vm(vm, item, VmState.STARTING, now=now, event="HaStarting",
                           message=f"VM {vm.name} starting on {locked.name} (HA): {why}",
                           host=locked, power_state_update_time=now,
                           step=Step.RESTARTING,
                           step_changes={"target_host": locked, "placement": why},
                           step_message=f"HA work #{item.pk}: starting VM {vm.name} on "
                                        f"{locked.name}"):
                return None
            return locked
    return None


def lock_best(found) -> tuple[Host, set[int]]:
    """Lock the best host of ``found`` that no other worker holds (they are placing a
    VM there now; skipped: ``busy``), among the first ``SKIP_AMONG``; when all of
    those are held, wait for the best. Many workers restarting a rack used to queue
    on the one best host's row lock, taking turns (issue 12)."""
    # FOR NO KEY UPDATE, not FOR UPDATE: other workers' commits check their VMs' host
    # foreign keys (deferred, FOR KEY SHARE) against this row; FOR UPDATE blocked them,
    # and with the incident row held too the workers deadlocked (R11 racing test).
    busy: set[int] = set()
    for room in found[:SKIP_AMONG]:
        host = (Host.objects.select_for_update(skip_locked=True, no_key=True)
                .filter(pk=room.id).first())
        if host is not None:
            return host, busy
        busy.add(room.id)
    return Host.objects.select_for_update(no_key=True).get(pk=found[0].id), set()


# --- restart order (R25) -------------------------------------------------------------------

ORDER_POLL = 5  # seconds between two looks of a VM waiting for higher priorities
RANK_WORDS = {0: "system", 1: "high-priority", 2: "medium-priority", 3: "low-priority"}


def order_wait(item, *, now, cfg) -> tuple[str, float] | None:
    """R25, ``ha.restart.order`` = strict: whether this HA item must wait for
    higher-priority VMs of its incident — (words, seconds to wait) — or None. It
    waits while any of them has an unfinished HA item and is not Running yet (a VM
    that failed, or that HA gave up on, no longer holds anyone back), until
    ``ha.restart.order.timeout`` after the incident was declared (detected, for a
    VM incident that has no declaration)."""
    from hadash.models import HaWork
    from vms.choices import VmState

    if cfg["ha.restart.order"] != "strict" or not item.incident_id or item.rank == 0:
        return None
    incident = item.incident
    since = incident.declared_at or incident.detected_at
    deadline = since + dt.timedelta(seconds=cfg["ha.restart.order.timeout"])
    if now >= deadline:
        return None
    ranks = list(HaWork.objects.unfinished().filter(
        incident_id=item.incident_id, type=WorkType.HA, rank__lt=item.rank,
    ).exclude(pk=item.pk).exclude(instance__state=VmState.RUNNING)
        .values_list("rank", flat=True))
    if not ranks:
        return None
    kinds = {RANK_WORDS.get(r, "higher-priority") for r in ranks}
    kind = kinds.pop() if len(kinds) == 1 else "higher-priority"
    n = len(ranks)
    words = (f"waits for {n} {kind} VM{'s' if n != 1 else ''} of incident #{incident.pk} "
             f"(strict restart order; at most until {deadline:%H:%M:%S})")
    left = (deadline - now).total_seconds()
    return words, max(1.0, min(float(ORDER_POLL), left))
