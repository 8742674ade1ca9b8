"""The engine as it runs in production (hadash.ha.runtime): leases, engine loops with
their sweeper and worker pool, takeover and stall alerts — in real time, against the
in-process simulated fleet (the HTTP path is covered by the end-to-end tests)."""

import datetime as dt
import threading
import time

import pytest
from django.db import connection
from django.utils import timezone

from fleet.sim import SimAgentClient, SimOobClient
from fleet.testing import world
from hadash import config
from hadash.ha import runtime
from hadash.ha.engine import Engine
from hadash.models import EngineProcess, Event, Lease
from hosts.agent.service import ping
from hosts.models import Host
from vms.models import VMInstance


def wait_until(cond, timeout=20.0, every=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return False


# --- leases (no threads) ---------------------------------------------------------------

@pytest.mark.django_db
def test_lease_is_held_by_one_and_taken_over_only_after_it_lapses():
    now = timezone.now()
    ttl = dt.timedelta(seconds=10)
    assert runtime.acquire("x", "a", ttl, now) == (True, None)
    assert runtime.acquire("x", "b", ttl, now + dt.timedelta(seconds=5))[0] is False
    assert runtime.acquire("x", "a", ttl, now + dt.timedelta(seconds=5))[0] is True  # renew
    held, previous = runtime.acquire("x", "b", ttl, now + dt.timedelta(seconds=16))
    assert held and previous[0] == "a"
    assert Lease.objects.get(name="x").holder == "b"
    runtime.release("x", "b")
    assert runtime.acquire("x", "c", ttl, now + dt.timedelta(seconds=17)) == (True, None)


@pytest.mark.django_db
def test_stalled_sweeper_raises_one_alert_per_stall():
    """Issue: a wedged engine raises an alert an operator can see — once per stall."""
    assert runtime.check_stall() is True
    assert runtime.check_stall() is True
    assert Event.objects.filter(event="EngineStalled", alert=True).count() == 1
    runtime.acquire(runtime.SWEEPER, "loop-1", runtime.SWEEPER_TTL)
    assert runtime.check_stall() is False
    time.sleep(1.2)  # the new holder swept for a while, then went silent
    Lease.objects.filter(name=runtime.SWEEPER).update(
        expires=timezone.now() - dt.timedelta(seconds=0.1))
    assert runtime.check_stall() is True
    assert Event.objects.filter(event="EngineStalled", alert=True).count() == 2


# --- loops (threads, real time) -----------------------------------------------------------

def run_loops(w, n, lifetime):
    def factory(wid):
        return Engine(agents=SimAgentClient(w.fleet), oob=SimOobClient(w.fleet), worker_id=wid)

    loops = [runtime.EngineLoop(engine_factory=factory, lifetime=lifetime, target=n)
             for _ in range(n)]
    threads = []
    for loop in loops:
        t = threading.Thread(target=lambda lp=loop: (lp.run(), connection.close()),
                             daemon=True)
        t.start()
        threads.append(t)
        time.sleep(0.05)  # registration order = start order
    return loops, threads


def stop_loops(loops, threads, stop=None):
    """End the loops (and the pinger); every loop thread must be gone."""
    if stop is not None:
        stop.set()
    for lp in loops:
        lp.stop()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)


def pinger(w, stop, every=0.5):
    """The simulated agents ping in real time while the test runs."""
    def run():
        try:
            while not stop.is_set():
                for h in w.fleet.hosts.values():
                    if h.reachable:
                        ping(Host.objects.get(name=h.name), h.report(), now=timezone.now())
                stop.wait(every)
        finally:
            connection.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.django_db(transaction=True)
def test_engine_loops_detect_a_dead_host_and_restart_its_vm_in_real_time():
    """R2/R5/R12 in production shape: two loops, one sweeper; a host powered off is
    Down within ping.interval × ping.timeout + 1 s of its last ping, and its HA VM runs
    elsewhere — started once."""
    w = world({"hosts": {"h1": {}, "h2": {}, "h3": {}},
               "vms": {"vm1": {"host": "h1", "ha": True}},
               "config": {"ping.interval": 1, "ping.timeout": 2}})
    stop = threading.Event()
    pinger(w, stop)
    loops, threads = run_loops(w, 2, lifetime=12)
    try:
        assert wait_until(lambda: sum(1 for lp in loops if lp.is_sweeper) == 1, 5)
        w.fleet.power_off("h1")
        off = time.monotonic()
        assert wait_until(lambda: Host.objects.get(name="h1").status == "Down", 8)
        detected = time.monotonic() - off
        assert detected <= 1 * 2 + 1 + 1  # interval × timeout + one sweep (+ ping period)
        assert wait_until(lambda: VMInstance.objects.get(name="vm1").state == "Running"
                          and VMInstance.objects.get(name="vm1").host.name != "h1", 5)
        assert [c for c in w.fleet.calls if c[0] == "start"] == [
            ("start", VMInstance.objects.get(name="vm1").host.name, "vm1")]
        assert EngineProcess.objects.filter(sweeper=True).count() == 1
    finally:
        stop_loops(loops, threads, stop)
    assert not EngineProcess.objects.exists()  # loops deregister when they end


@pytest.mark.django_db(transaction=True)
def test_standby_loop_takes_over_a_silent_sweeper_and_alerts():
    """Issue 3: exactly one active sweeper; when it stops renewing its lease (a dead or
    wedged process), another loop takes over within the lease TTL, with an alert."""
    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {}})
    loops, threads = run_loops(w, 2, lifetime=30)
    try:
        assert wait_until(lambda: sum(1 for lp in loops if lp.is_sweeper) == 1, 5)
        active = next(lp for lp in loops if lp.is_sweeper)
        standby = next(lp for lp in loops if not lp.is_sweeper)
        # Wedge the active sweeper: it keeps running but can no longer renew.
        active.take_sweeper = lambda: None
        active.is_sweeper = False
        wedged_at = time.monotonic()
        assert wait_until(lambda: standby.is_sweeper, runtime.SWEEPER_TTL.total_seconds() + 3)
        assert time.monotonic() - wedged_at <= runtime.SWEEPER_TTL.total_seconds() + 2
        takeover = Event.objects.get(event="SweeperTakeover")
        assert takeover.alert and takeover.old == active.id and takeover.new == standby.id
    finally:
        stop_loops(loops, threads)


@pytest.mark.django_db(transaction=True)
def test_worker_pool_follows_ha_workers_without_restart():
    """Issue 3 / SPEC §2 ha.workers: an edit changes the pool within a second or two."""
    w = world({"hosts": {"h1": {}}, "vms": {}})
    loops, threads = run_loops(w, 1, lifetime=8)
    loop = loops[0]
    try:
        assert wait_until(lambda: len([t for t in loop.pool.threads.values()
                                       if t.is_alive()]) == 5, 5)
        config.set_value("ha.workers", 2)
        assert wait_until(lambda: len([t for t in loop.pool.threads.values()
                                       if t.is_alive()]) == 2, 5)
        assert wait_until(lambda: EngineProcess.objects.filter(workers=2).exists(), 5)
        config.set_value("ha.workers", 7)
        assert wait_until(lambda: len([t for t in loop.pool.threads.values()
                                       if t.is_alive()]) == 7, 5)
    finally:
        loop.stop()
        for t in threads:
            t.join(30)


@pytest.mark.django_db(transaction=True)
def test_surplus_loops_leave_at_once():
    """ensure_engine may enqueue more loops than wanted; the surplus ones exit."""
    w = world({"hosts": {"h1": {}}, "vms": {}})
    loops, threads = run_loops(w, 1, lifetime=4)
    assert wait_until(lambda: EngineProcess.objects.count() == 1, 5)
    extra = runtime.EngineLoop(engine_factory=loops[0].engine_factory, lifetime=4, target=1)
    assert extra.run() == "not needed"
    assert EngineProcess.objects.count() == 1
    loops[0].stop()
    for t in threads:
        t.join(30)


@pytest.mark.django_db
def test_a_lost_loop_raises_one_alert_naming_the_work_it_held():
    """Issue 3: a wedged or killed engine loop stops heartbeating; the next
    ensure_engine run raises an alert naming the HA work it still holds."""
    from hadash.choices import Reason
    from hadash.ha import work
    from hadash.tasks import ensure_engine

    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {"vm1": {"host": "h1", "ha": True}}})
    work.schedule_restart(VMInstance.objects.get(name="vm1"), investigate=True,
                          reason=Reason.OPERATOR, now=timezone.now())
    stale = timezone.now() - dt.timedelta(minutes=2)
    EngineProcess.objects.create(id="box:42:abc", host="box", pid=42, started=stale,
                                 heartbeat=stale)
    from hadash.models import HaWork

    HaWork.objects.update(taken=stale, taken_by="box:42:abc/w0")
    ensure_engine()
    ensure_engine()
    lost = Event.objects.filter(event="EngineLoopLost")
    assert lost.count() == 1 and lost[0].alert
    assert "box:42:abc" in lost[0].message and "vm1" in lost[0].message
    assert not EngineProcess.objects.filter(id="box:42:abc").exists()
    assert w  # the world made the VM


@pytest.mark.django_db(transaction=True)
def test_sweeper_detects_a_host_the_moment_it_falls_behind_not_on_the_next_sweep(
    monkeypatch,
):
    """R2 (issue 3, detection latency): between full sweeps the sweeper wakes when the
    next host falls behind on ping. With full sweeps stretched to one a minute, a host
    that stops pinging is still found behind, investigated and Down long before the
    next full sweep — and its HA VM restarted (the workers are woken, not polled)."""
    monkeypatch.setattr(runtime, "SWEEP_EVERY", 60.0)
    w = world({"hosts": {"h1": {}, "h2": {}},
               "vms": {"vm1": {"host": "h1", "ha": True}},
               "config": {"ping.interval": 1, "ping.timeout": 2}})
    stop = threading.Event()
    pinger(w, stop, every=0.3)
    loops, threads = run_loops(w, 1, lifetime=30)
    try:
        assert wait_until(lambda: loops[0].is_sweeper, 5)
        time.sleep(0.5)  # the loop's one full sweep is over: it now waits 60 s
        w.fleet.power_off("h1")
        assert wait_until(lambda: Host.objects.get(name="h1").status == "Down", 15)
        assert wait_until(lambda: VMInstance.objects.get(name="vm1").state == "Running"
                          and VMInstance.objects.get(name="vm1").host.name == "h2", 15)
        assert Event.objects.filter(subject_name="h1", event="PingTimeout").count() == 1
    finally:
        stop_loops(loops, threads, stop)
