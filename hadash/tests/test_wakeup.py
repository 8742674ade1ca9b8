"""hadash.ha.wakeup: idle HA workers learn of work scheduled by another process (a web
process ingesting an agent's PowerOff report) at once, through PostgreSQL's NOTIFY,
instead of at their next one-second look."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import transaction
from django.utils import timezone

from fleet.testing import world
from hadash.choices import Reason, Subject
from hadash.events import record_event
from hadash.ha import wakeup
from hadash.models import HaWork
from vms.models import VMInstance


def schedule_restart_of_vm1() -> VMInstance:
    """What ingesting a PowerOff report does: the item and its event, one commit."""
    world({"hosts": {"h1": {}, "h2": {}}, "vms": {"vm1": {"host": "h1", "ha": True}}})
    vm = VMInstance.objects.get(name="vm1")
    with transaction.atomic():
        HaWork.objects.schedule_restart(vm, investigate=True, reason=Reason.VM_POWER_OFF,
                                        now=timezone.now())
    return vm


def commit_events(vm, n: int, until: threading.Event, wait: float) -> None:
    """Commit up to ``n`` events (each NOTIFYs), until ``until`` is set."""
    for _ in range(n):
        with transaction.atomic():
            record_event(Subject.VM, vm, event="PowerStateChanged", message="test",
                         now=timezone.now())
        if until.wait(wait):
            return


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_work_scheduled_elsewhere_wakes_the_workers():
    woken = threading.Event()
    stop = threading.Event()
    listener = threading.Thread(target=wakeup.run, args=(stop, woken.set), daemon=True)
    listener.start()
    try:
        vm = schedule_restart_of_vm1()
        # The listener may not be LISTENing yet: commit again until it wakes.
        commit_events(vm, 40, woken, 0.5)
        assert woken.is_set()
    finally:
        stop.set()
        listener.join(5)
    assert not listener.is_alive()


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_no_look_for_work_while_every_worker_is_busy(monkeypatch):
    """Issue 12: while a rack restarts every event NOTIFYs; with every worker of the
    process busy (each claims its next item itself) the listener neither looks for due
    work (a query each time) nor wakes anyone; once one waits, it does both."""
    looks, woken, stop = [], threading.Event(), threading.Event()
    idle = threading.Event()  # whether a worker waits
    real = wakeup.work_due

    def counting():
        looks.append(1)
        return real()

    monkeypatch.setattr(wakeup, "work_due", counting)
    listener = threading.Thread(target=wakeup.run, args=(stop, woken.set, idle.is_set),
                                daemon=True)
    listener.start()
    try:
        vm = schedule_restart_of_vm1()
        idle.set()
        commit_events(vm, 40, woken, 0.1)  # until the listener LISTENs and wakes
        assert woken.is_set() and looks
        idle.clear()  # every worker busy from now on
        woken.clear()
        time.sleep(0.2)
        looks.clear()
        commit_events(vm, 20, woken, 0.1)
        assert not woken.is_set() and looks == []
        idle.set()
        commit_events(vm, 20, woken, 0.1)
        assert woken.is_set() and looks
    finally:
        stop.set()
        listener.join(5)
    assert not listener.is_alive()
