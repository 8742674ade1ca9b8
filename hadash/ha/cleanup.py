"""Cleanup (R16): every time.between.cleanup, purge Done and Cancelled items older
than time.between.failures. Their events stay."""

from __future__ import annotations

import datetime as dt

from django.db import transaction

from hadash import config
from hadash.choices import PURGEABLE_STEPS
from hadash.models import HaWork, Lease

LEASE_NAME = "ha.cleanup"


def cleanup_step(engine, *, force: bool = False, cfg=None) -> int:
    """Purge if a cleanup is due (or ``force``). Returns the number of items purged."""
    now = engine.now()
    cfg = cfg or config.snapshot()
    every = dt.timedelta(seconds=cfg["time.between.cleanup"])
    last = Lease.objects.filter(name=LEASE_NAME).values_list("last_run", flat=True).first()
    if not force and last is not None and now - last < every:
        return 0  # not due: decided without a lock
    with transaction.atomic():
        Lease.objects.get_or_create(name=LEASE_NAME)
        lease = Lease.objects.select_for_update().get(name=LEASE_NAME)
        if not force and lease.last_run is not None and now - lease.last_run < every:
            return 0
        lease.last_run = now
        lease.save(update_fields=["last_run"])
    cutoff = now - dt.timedelta(seconds=cfg["time.between.failures"])
    deleted, _ = HaWork.objects.filter(step__in=PURGEABLE_STEPS, updated__lt=cutoff).delete()
    return deleted
