"""When could the engine next act? The earliest moment a sweep or a worker step can
change anything, given the database as it is now (nothing arrives meanwhile).

The scenario runner uses it to skip idle virtual seconds between pings; skipped
seconds are exactly those in which every sweep and worker step would do nothing
(scenario tests check that a run with skipping equals a run second by second).
"""

from __future__ import annotations

import datetime as dt

from django.db.models import Min, Q

from hadash.choices import FINAL_STEPS
from hadash.models import HaWork, Lease
from hosts.choices import SWEPT_STATUSES, UNWATCHED_HOST_TYPES, HostStatus, ResourceState
from hosts.models import Host


def next_due(now, cfg) -> dt.datetime:
    """The earliest time at which monitor_step, worker_step or cleanup_step may act
    (``now`` when something is due already)."""
    from hadash.ha.cleanup import LEASE_NAME
    from hadash.ha.work import WORK_LEASE

    candidates: list[dt.datetime] = []
    threshold = dt.timedelta(seconds=cfg["ping.interval"] * cfg["ping.timeout"])
    watched = Host.objects.exclude(type__in=UNWATCHED_HOST_TYPES)
    # A swept host falls behind at last_ping + threshold (then investigated, R2)…
    swept = watched.filter(status__in=SWEPT_STATUSES)
    if swept.filter(Q(last_ping__isnull=True)).exists():
        return now
    lp = swept.aggregate(m=Min("last_ping"))["m"]
    if lp is not None:
        candidates.append(lp + threshold)
    # …unless it is under investigation already: then at its next_investigation.
    nxt = watched.filter(status__in=[*SWEPT_STATUSES, HostStatus.ALERT],
                         next_investigation__isnull=False) \
        .aggregate(m=Min("next_investigation"))["m"]
    if nxt is not None:
        candidates.append(nxt)
    if watched.filter(status=HostStatus.ALERT, next_investigation__isnull=True).exists():
        return now
    # R18: a host on time again whose incident is still Open is dismissed by a sweep.
    from hadash.incidents import returned_pending

    if returned_pending(cutoff=now - threshold):
        return now
    if Host.objects.filter(resource_state=ResourceState.PREPARE_FOR_MAINTENANCE).exists():
        return now  # maintenance completion is checked every sweep
    # Work items: their time to try, or the lapse of a worker's lease (R11).
    open_items = HaWork.objects.exclude(step__in=FINAL_STEPS)
    ttt = open_items.filter(taken__isnull=True).aggregate(m=Min("time_to_try"))["m"]
    if ttt is not None:
        candidates.append(ttt)
    taken = open_items.filter(taken__isnull=False).aggregate(m=Min("taken"))["m"]
    if taken is not None:
        candidates.append(taken + WORK_LEASE)
    last = Lease.objects.filter(name=LEASE_NAME).values_list("last_run", flat=True).first()
    candidates.append(now if last is None
                      else last + dt.timedelta(seconds=cfg["time.between.cleanup"]))
    # R22/R23: a changed cluster's plan is recomputed — and its failover-level alert
    # follows — at the first sweep MIN_INTERVAL after its last computation.
    from clusters import plans

    refresh = plans.next_refresh(now=now, cfg=cfg)
    if refresh is not None:
        candidates.append(refresh)
    return max(now, min(candidates))
