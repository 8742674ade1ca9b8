"""Keeping failover plans current (R22): each monitor sweep compares every cluster's
fingerprint (vms.failover.fingerprints — two aggregate queries) with the one its stored
plan was computed from, and recomputes the clusters that changed (at most every
MIN_INTERVAL seconds per cluster, so a busy incident does not recompute every second).
A plan is derived data, not a state change: no event is written for it; the R23 alert
of a cluster below its failover level (clusters.admission.sync_alerts) opens and
resolves here, with its events."""

from __future__ import annotations

import datetime as dt
import logging

from django.db import DatabaseError, transaction

from vms import failover

from . import admission
from .models import FailoverPlan

log = logging.getLogger("hadash.plans")

MIN_INTERVAL = 2.0  # seconds between two recomputations of one cluster


def store(plan: failover.Plan, *, now, fingerprint: str = "") -> FailoverPlan:
    fields = dict(
        computed_at=now, capacity=plan.capacity, level=plan.level, plan=plan.per_host,
        summaries=plan.summaries, unfit=plan.unfit_ids, worst=plan.worst,
        exhaustive=plan.exhaustive, hosts=plan.hosts, ha_vms=plan.ha_vms,
        took_ms=plan.took_ms, fingerprint=fingerprint,
    )
    # The usual case, a cluster planned before: one UPDATE … RETURNING id — not
    # update_or_create's SELECT … FOR UPDATE, which reads back the old plan (a JSON of
    # every HA VM of a 1,000-host cluster) only to overwrite it.
    pk = (FailoverPlan.objects.filter(cluster=plan.cluster)
          .values_list("pk", flat=True).first())
    if pk is not None and FailoverPlan.objects.filter(pk=pk).update(**fields):
        return FailoverPlan(pk=pk, cluster=plan.cluster, **fields)
    row, _ = FailoverPlan.objects.update_or_create(cluster=plan.cluster, defaults=fields)
    return row


def recompute(clusters=None, *, now, cfg=None, fingerprints=None) -> list[FailoverPlan]:
    """Compute and store the plans of ``clusters`` (all when None) now."""
    states = failover.load(clusters, cfg=cfg)
    rows = []
    with transaction.atomic():
        for name, state in states.items():
            plan = failover.compute(state)
            rows.append(store(plan, now=now,
                              fingerprint=(fingerprints or {}).get(name, "")))
        gone = FailoverPlan.objects.exclude(cluster__in=list(states))
        if clusters is not None:
            gone = gone.filter(cluster__in=list(clusters))
        gone.delete()
    return rows


def refresh(*, now, cfg, force: bool = False) -> list[str]:
    """The sweep's check: recompute the plans of clusters whose capacity state changed.
    Returns the names recomputed. Never stops the sweep for anything but the database."""
    try:
        prints = failover.fingerprints(cfg=cfg)
        stored = {c: (fp, at) for c, fp, at in
                  FailoverPlan.objects.values_list("cluster", "fingerprint", "computed_at")}
        due = []
        for cluster, fp in prints.items():
            old = stored.get(cluster)
            if old is None or force:
                due.append(cluster)
            elif old[0] != fp and now - old[1] >= dt.timedelta(seconds=MIN_INTERVAL):
                due.append(cluster)
        gone = [c for c in stored if c not in prints]
        if gone:
            FailoverPlan.objects.filter(cluster__in=gone).delete()
        if due:
            recompute(due, now=now, cfg=cfg, fingerprints=prints)
        # R23: the failover-level alert follows the stored capacities (and the level
        # and admission mode of now).
        admission.sync_alerts(now=now, cfg=cfg)
        return due
    except DatabaseError:
        raise
    except Exception:  # a bug in planning must never stop HA
        log.exception("failover plan: recomputation failed")
        return []


def next_refresh(*, now, cfg):
    """When the sweep's `refresh` will next recompute a plan (and the R23 alert may
    follow): ``now`` for a cluster without a stored plan (or a stored plan without a
    cluster), MIN_INTERVAL after the last computation for a cluster whose state
    changed since; None when every plan is current. For hadash.ha.due (the scenario
    runner skips no second in which this happens)."""
    prints = failover.fingerprints(cfg=cfg)
    stored = {c: (fp, at) for c, fp, at in
              FailoverPlan.objects.values_list("cluster", "fingerprint", "computed_at")}
    if any(c not in prints for c in stored):
        return now
    soonest = None
    for cluster, fp in prints.items():
        old = stored.get(cluster)
        if old is None:
            return now
        if old[0] != fp:
            at = old[1] + dt.timedelta(seconds=MIN_INTERVAL)
            soonest = at if soonest is None else min(soonest, at)
    return soonest


def current(cluster: str, *, now, cfg=None) -> FailoverPlan | None:
    """The stored plan of ``cluster``, computed now when there is none yet (no engine
    ran since the cluster appeared). None for an unknown cluster."""
    row = FailoverPlan.objects.filter(cluster=cluster).first()
    if row is None:
        rows = recompute([cluster], now=now, cfg=cfg)
        row = rows[0] if rows else None
    return row
