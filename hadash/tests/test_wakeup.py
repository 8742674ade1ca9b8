"""hadash.ha.wakeup: idle HA workers learn of work scheduled by another process (a web
process ingesting an agent's PowerOff report) at once, through PostgreSQL's NOTIFY,
instead of at their next one-second look."""

from __future__ import annotations

import threading

import pytest
from django.db import transaction
from django.utils import timezone

from fleet.testing import world
from hadash.choices import Reason, Subject
from hadash.events import record_event
from hadash.ha import wakeup
from hadash.models import HaWork
from vms.models import VMInstance


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_work_scheduled_elsewhere_wakes_the_workers():
    world({"hosts": {"h1": {}, "h2": {}}, "vms": {"vm1": {"host": "h1", "ha": True}}})
    woken = threading.Event()
    stop = threading.Event()
    listener = threading.Thread(target=wakeup.run, args=(stop, woken.set), daemon=True)
    listener.start()
    try:
        vm = VMInstance.objects.get(name="vm1")
        # What ingesting a PowerOff report does: the item and its event, one commit.
        # The listener may not be LISTENing yet: commit again until it wakes (each
        # commit NOTIFYs).
        with transaction.atomic():
            HaWork.objects.schedule_restart(vm, investigate=True, reason=Reason.VM_POWER_OFF,
                                            now=timezone.now())
        for _ in range(40):
            with transaction.atomic():
                record_event(Subject.VM, vm, event="PowerStateChanged", message="test",
                             now=timezone.now())
            if woken.wait(0.5):
                break
        assert woken.is_set()
    finally:
        stop.set()
        listener.join(5)
    assert not listener.is_alive()
