"""Concurrency on PostgreSQL (R10, R11, SPEC §6): workers in separate threads, each
with its own database connection, race for the same items. Each item is processed
once, no VM is started twice, and never more than ha.workers items are in flight."""

import threading

import pytest
from django.db import connection

from fleet.testing import world
from hadash import config
from hadash.choices import Reason, Step, WorkType
from hadash.ha import work, worker
from hadash.models import Event, HaWork
from vms.models import VMInstance

pytestmark = [pytest.mark.postgres_only, pytest.mark.django_db(transaction=True)]


def in_threads(n, fn):
    """Run fn(i) in n threads released together; re-raise the first error."""
    barrier = threading.Barrier(n)
    errors, results = [], [None] * n

    def run(i):
        try:
            barrier.wait(timeout=10)
            results[i] = fn(i)
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    if errors:
        raise errors[0]
    return results


def test_racing_workers_process_each_item_once():
    """R11: four workers drain 40 HA items of a failed host together; every VM is
    restarted exactly once and every item is Done exactly once."""
    vms = {f"vm{i:02}": {"host": "h1", "ha": True} for i in range(40)}
    w = world({"hosts": {"h1": {"cpus": 64}, "h2": {"cpus": 64}, "h3": {"cpus": 64}},
               "vms": vms, "config": {"ha.workers": 4}})
    w.fleet.power_off("h1")
    w.advance_to(25)
    from hosts.liveness import host_down
    from hosts.models import Host

    assert host_down(Host.objects.get(name="h1"), now=w.clock.now(), cfg=config.snapshot(),
                     by="test")
    assert HaWork.objects.filter(type=WorkType.HA).count() == 40

    def drain(i):
        engine = w.engine.with_worker(f"worker-{i}")
        done = 0
        while worker.worker_step(engine):
            done += 1
        return done

    counts = in_threads(4, drain)
    assert sum(counts) == 40
    assert set(HaWork.objects.values_list("step", flat=True)) == {Step.DONE}
    starts = [c for c in w.fleet.calls if c[0] == "start"]
    assert sorted(c[2] for c in starts) == sorted(vms)  # one start per VM
    assert Event.objects.filter(event="HaStarted").count() == 40
    # Each item's Done was written once.
    done_events = Event.objects.filter(subject="work", new=Step.DONE)
    assert done_events.count() == 40
    assert w.fleet.double_runs() == {}
    assert not VMInstance.objects.exclude(state="Running").exists()


def test_concurrent_scheduling_makes_one_item():
    """R10: eight processes scheduling a restart for the same VM at once leave exactly
    one unfinished HA item — the database constraint decides."""
    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {"vm1": {"host": "h1", "ha": True}}})

    def schedule(i):
        v = VMInstance.objects.get(name="vm1")
        return work.schedule_restart(v, investigate=True, reason=Reason.OPERATOR,
                                     now=w.clock.now())

    results = in_threads(8, schedule)
    assert sum(1 for r in results if r is not None) == 1
    assert HaWork.objects.filter(type=WorkType.HA).exclude(step=Step.DONE).count() == 1


def test_concurrent_claims_respect_ha_workers():
    """R11: twelve workers claim at once with ha.workers 3: exactly three items are
    taken, by three different workers."""
    vms = {f"vm{i:02}": {"host": "h1", "ha": True} for i in range(12)}
    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": vms, "config": {"ha.workers": 3}})
    for v in VMInstance.objects.all():
        work.schedule_restart(v, investigate=True, reason=Reason.OPERATOR, now=w.clock.now())

    def claim(i):
        item = work.claim(w.engine.with_worker(f"w{i}"), config.snapshot())
        return item.pk if item else None

    taken = [pk for pk in in_threads(12, claim) if pk]
    assert len(taken) == 3 and len(set(taken)) == 3
    assert HaWork.objects.filter(taken__isnull=False).count() == 3
    assert len(set(HaWork.objects.filter(taken__isnull=False)
                   .values_list("taken_by", flat=True))) == 3
