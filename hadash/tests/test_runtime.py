"""The engine as it runs in production (hadash.ha.runtime): leases, engine loops with
their sweeper and worker pool, takeover and stall alerts — in real time, against the
in-process simulated fleet (the HTTP path is covered by the end-to-end tests)."""

import datetime as dt
import threading
import time

import pytest
from django.db import connection, connections
from django.db.utils import InterfaceError, OperationalError
from django.utils import timezone

from fleet.sim import SimAgentClient, SimOobClient
from fleet.testing import world
from hadash import config, outage
from hadash.ha import runtime
from hadash.ha.engine import Engine
from hadash.models import Alert, EngineProcess, Event, HaWork, Lease
from hosts.agent.service import ping
from hosts.models import Host
from vms.models import VMInstance

DB_ERRORS = (OperationalError, InterfaceError)


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
    """Issue: a wedged engine raises an alert an operator can see — once per stall,
    resolved by itself when a sweeper runs again (R19)."""
    assert runtime.check_stall() is True
    assert runtime.check_stall() is True
    assert Event.objects.filter(event="EngineStalled").count() == 1
    assert list(Alert.objects.values_list("kind", "state")) == [("EngineStalled", "open")]
    runtime.acquire(runtime.SWEEPER, "loop-1", runtime.SWEEPER_TTL)
    assert runtime.check_stall() is False
    assert list(Alert.objects.values_list("state", flat=True)) == ["resolved"]
    time.sleep(1.2)  # the new holder swept for a while, then went silent
    Lease.objects.filter(name=runtime.SWEEPER).update(
        expires=timezone.now() - dt.timedelta(seconds=0.1))
    assert runtime.check_stall() is True
    assert Event.objects.filter(event="EngineStalled").count() == 2
    assert list(Alert.objects.order_by("id").values_list("state", flat=True)) == [
        "resolved", "open"]


# --- loops (threads, real time) -----------------------------------------------------------

def run_loops(w, n, lifetime):
    def factory(wid):
        return Engine(agents=SimAgentClient(w.fleet), oob=SimOobClient(w.fleet), worker_id=wid)

    loops = [runtime.EngineLoop(engine_factory=factory, lifetime=lifetime)
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
                try:
                    for h in w.fleet.hosts.values():
                        if h.reachable:
                            ping(Host.objects.get(name=h.name), h.report(),
                                 now=timezone.now())
                except DB_ERRORS:  # a test cut every connection: like a web process,
                    connection.close()  # reconnect with the next ping
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
        def restarted() -> bool:  # one read: HA may move it (Stopped, host None) between two
            vm = VMInstance.objects.select_related("host").get(name="vm1")
            return vm.state == "Running" and vm.host is not None and vm.host.name != "h1"

        assert wait_until(restarted, 5)
        assert [c for c in w.fleet.calls if c[0] == "start"] == [
            ("start", VMInstance.objects.get(name="vm1").host.name, "vm1")]
        assert EngineProcess.objects.filter(sweeper=True).count() == 1
    finally:
        stop_loops(loops, threads, stop)
    assert not EngineProcess.objects.exists()  # loops deregister when they end


@pytest.mark.django_db(transaction=True)
def test_standby_loop_takes_over_a_silent_sweeper_and_alerts():
    """Issue 3: exactly one active sweeper; when it stops renewing its lease (a dead or
    wedged process), another loop takes over within the lease TTL, with a warning
    event (the takeover is the recovery: no alert stays open, R19)."""
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
        assert takeover.severity == "warning"
        assert takeover.old == active.id and takeover.new == standby.id
        assert not Alert.objects.filter(state="open").exists()
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
def test_loops_share_ha_workers_and_one_left_takes_them_all():
    """Issue 12 / R11: ha.workers is the installation's; two engine loops run half the
    threads each (each holds a database connection), and when one hands over the other
    grows to the whole within a second or two."""
    w = world({"hosts": {"h1": {}}, "vms": {}, "config": {"ha.workers": 6}})
    loops, threads = run_loops(w, 2, lifetime=20)

    def alive(loop) -> int:
        return len([t for t in loop.pool.threads.values() if t.is_alive()])

    try:
        assert wait_until(lambda: [alive(lp) for lp in loops] == [3, 3], 8), \
            [alive(lp) for lp in loops]
        loops[0].stop()
        threads[0].join(30)
        assert wait_until(lambda: alive(loops[1]) == 6, 5), alive(loops[1])
    finally:
        stop_loops(loops, threads)


@pytest.mark.django_db(transaction=True)
def test_a_lost_loop_raises_one_alert_and_its_work_is_retaken_at_once(monkeypatch):
    """Issue 3 / issue 8 part 6 (R11): a killed or wedged engine loop stops
    heartbeating; the sweeper raises one alert naming the HA work it still holds and
    releases that work — the VM is restarted at once, not when the item's 5-minute
    lease lapses (here the lease has 4 minutes to go)."""
    monkeypatch.setattr(runtime, "LOST_AFTER", dt.timedelta(seconds=2))
    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {"vm1": {"host": "h1", "ha": True}},
               "config": {"ping.interval": 1, "ping.timeout": 30}})
    w.fleet.power_off("h1")
    from hosts.liveness import host_down

    assert host_down(Host.objects.get(name="h1"), now=timezone.now(), cfg=config.snapshot(),
                     by="test")
    stale = timezone.now() - dt.timedelta(minutes=1)
    EngineProcess.objects.create(id="box:42:abc", host="box", pid=42, started=stale,
                                 heartbeat=stale)
    HaWork.objects.update(taken=stale, taken_by="box:42:abc/w0")
    stop = threading.Event()
    pinger(w, stop)
    loops, threads = run_loops(w, 1, lifetime=30)
    try:
        assert wait_until(lambda: HaWork.objects.get().step == "Done", 15)
    finally:
        stop_loops(loops, threads, stop)
    lost = Event.objects.filter(event="EngineLoopLost")
    assert lost.count() == 1
    [alert] = Alert.objects.filter(kind="EngineLoopLost")  # R19: one per lost loop
    assert alert.subject_name == "box:42:abc" and alert.state == "open"
    assert "box:42:abc" in lost[0].message and "vm1" in lost[0].message
    assert not EngineProcess.objects.filter(id="box:42:abc").exists()
    item = HaWork.objects.get()
    assert Event.objects.filter(event="WorkRetry", subject_id=item.pk,
                                message__contains="box:42:abc").count() == 1
    vm = VMInstance.objects.select_related("host").get(name="vm1")
    assert vm.state == "Running" and vm.host.name == "h2"


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


# --- database outages (issue 8 part 7) --------------------------------------------------------

def terminate_backends(*pids):
    """pg_terminate_backend, from a connection of its own (what a PostgreSQL restart or
    an administrator does to a process's connections: AdminShutdown), and wait until
    they are gone. No pids: every backend of the test database but this thread's."""
    other = connections.create_connection("default")
    try:
        with other.cursor() as c:
            if not pids:
                c.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                          " AND pid <> pg_backend_pid() AND pid <> %s",
                          [connection.connection.info.backend_pid if connection.connection
                           else 0])
                pids = [r[0] for r in c.fetchall()]
            for pid in pids:
                c.execute("SELECT pg_terminate_backend(%s)", [pid])
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                c.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)",
                          [list(pids)])
                if not c.fetchone()[0]:
                    break
                time.sleep(0.02)
    finally:
        other.close()
    return pids


def cut_this_threads_connection():
    terminate_backends(connection.connection.info.backend_pid)


class CuttingAgents(SimAgentClient):
    """The simulated agents; after the first start they cut the calling worker's own
    database connection (the start went through, nothing of it is committed yet)."""

    def __init__(self, fleet, cut):
        super().__init__(fleet)
        self.cut = cut

    def start_vm(self, host, vm):
        super().start_vm(host, vm)
        if not self.cut.is_set():
            self.cut.set()
            cut_this_threads_connection()


def cut_before(state, cut):
    """An execute wrapper: cut the connection just before the worker writes the VM's
    move to ``state`` (that statement, and the transaction it is in, fail)."""
    def wrapper(execute, sql, params, many, context):
        if (not cut.is_set() and sql.startswith('UPDATE "vm_instance"')
                and state in (params or ())):
            cut.set()
            cut_this_threads_connection()
        return execute(sql, params, many, context)
    return wrapper


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("moment", ["Starting", "started", "Running"])
def test_a_worker_whose_connection_is_cut_mid_step_finishes_its_item_within_seconds(
    moment, caplog, monkeypatch,
):
    """Issue 8 part 7 (R11, R12, SPEC §6): the database connection of the HA worker
    restarting a VM is terminated (AdminShutdown) — while it moves the VM to Starting
    (before the start call), right after the agent started it, or while it commits
    "VM Running". The worker reconnects and releases the item at once; the retry
    finishes it: the VM runs on the other host within seconds, started exactly once,
    never left Starting — not after the 5-minute lease. One warning line, no
    traceback."""
    caplog.set_level("INFO", logger="hadash")
    monkeypatch.setattr(outage, "_since", None)  # no outage left over from another test
    w = world({"hosts": {"h1": {}, "h2": {}}, "vms": {"vm1": {"host": "h1", "ha": True}}})
    w.fleet.power_off("h1")
    from hosts.liveness import host_down

    assert host_down(Host.objects.get(name="h1"), now=timezone.now(), cfg=config.snapshot(),
                     by="test")
    cut = threading.Event()
    agents = CuttingAgents(w.fleet, cut) if moment == "started" else SimAgentClient(w.fleet)

    def factory(wid):  # called in the worker's own thread
        if moment != "started":
            connection.execute_wrappers.append(cut_before(moment, cut))
        return Engine(agents=agents, oob=SimOobClient(w.fleet), worker_id=wid)

    pool = runtime.WorkerPool(factory, "test-loop")
    pool.resize(1)
    try:
        assert wait_until(cut.is_set, 10)
        cut_at = time.monotonic()
        assert wait_until(lambda: HaWork.objects.get().step == "Done", 15), \
            HaWork.objects.values("step", "taken_by", "last_error").get()
        took = time.monotonic() - cut_at
    finally:
        pool.stop()
    vm = VMInstance.objects.select_related("host").get(name="vm1")
    assert vm.state == "Running" and vm.host.name == "h2"
    item = HaWork.objects.get()
    assert item.taken is None
    assert [c for c in w.fleet.calls if c[0] == "start"] == [("start", "h2", "vm1")]
    assert w.fleet.double_runs() == {}
    assert Event.objects.filter(event="WorkRetry", subject_id=item.pk,
                                message__contains="database connection lost").count() == 1
    assert Event.objects.filter(event="HaStarted").count() == 1
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert warnings[0].getMessage().startswith(
        "database unavailable (OperationalError: terminating connection due to administrator")
    assert not [r for r in caplog.records if r.levelno >= 40]  # no error, no traceback
    assert took < 10  # seconds, not the 5-minute lease (R11)


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_engine_loop_lives_through_every_connection_being_cut(caplog, monkeypatch):
    """Issue 8 part 7: every database connection of the engine is terminated at once
    (what a PostgreSQL restart does). The loop reconnects and goes on sweeping — a
    host powered off afterwards is Down and its HA VM restarted — and the outage costs
    one warning line, not a traceback per thread."""
    caplog.set_level("INFO", logger="hadash")
    monkeypatch.setattr(outage, "_since", None)  # no outage left over from another test
    w = world({"hosts": {"h1": {}, "h2": {}, "h3": {}},
               "vms": {"vm1": {"host": "h1", "ha": True}},
               "config": {"ping.interval": 1, "ping.timeout": 2}})
    stop = threading.Event()
    pinger(w, stop)
    loops, threads = run_loops(w, 1, lifetime=40)
    loop = loops[0]
    try:
        assert wait_until(lambda: loop.is_sweeper, 5)
        time.sleep(1.5)  # workers and investigators have their connections too
        assert len(terminate_backends()) >= 2
        cut = timezone.now()
        assert wait_until(lambda: EngineProcess.objects.filter(
            id=loop.id, heartbeat__gt=cut, sweeper=True).exists(), 5)
        w.fleet.power_off("h1")
        assert wait_until(lambda: Host.objects.get(name="h1").status == "Down", 10)
        assert wait_until(lambda: VMInstance.objects.get(name="vm1").state == "Running"
                          and VMInstance.objects.get(name="vm1").host.name != "h1", 10)
        assert loop.is_sweeper and not Event.objects.filter(event="SweeperTakeover").exists()
    finally:
        stop_loops(loops, threads, stop)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("database unavailable"), warnings
    assert not [r for r in caplog.records if r.levelno >= 40]


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_after_a_database_outage_no_loop_is_declared_lost_too_soon(monkeypatch):
    """Issue 8 part 7 (R11): after an outage every loop's heartbeat is stale. A loop
    reaps another (EngineLoopLost, its HA items released) only once it has itself been
    in touch with the database for LOST_AFTER — so the others have had that long to
    heartbeat again — never on its first sweep back."""
    monkeypatch.setattr(runtime, "LOST_AFTER", dt.timedelta(seconds=4))
    monkeypatch.setattr(outage, "_since", None)
    w = world({"hosts": {"h1": {}}, "vms": {}})
    stale = timezone.now() - dt.timedelta(minutes=1)  # silent since the outage began
    EngineProcess.objects.create(id="box:42:abc", host="box", pid=42, started=stale,
                                 heartbeat=stale)
    started = time.monotonic()
    loops, threads = run_loops(w, 1, lifetime=30)
    try:
        assert wait_until(lambda: loops[0].is_sweeper, 3)
        time.sleep(max(0.0, started + 3 - time.monotonic()))
        terminate_backends()  # the outage, as the sweeper sees it
        time.sleep(max(0.0, started + 6 - time.monotonic()))
        # Without the outage it would have been reaped 4 s after the loop started.
        assert EngineProcess.objects.filter(id="box:42:abc").exists()
        assert wait_until(lambda: not EngineProcess.objects.filter(id="box:42:abc").exists(),
                          10)
    finally:
        stop_loops(loops, threads)
    assert Event.objects.filter(event="EngineLoopLost", subject_name="box:42:abc").count() == 1


def test_django_q_reports_a_database_error_in_one_line():
    """Issue 8 part 7: during an outage django-q's pusher logs a failed poll every
    10 s; in hadash's processes that is one line naming the error, not a traceback."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("django-q")
    log.addHandler(handler)
    try:
        try:
            raise OperationalError("terminating connection due to administrator command\n"
                                   "server closed the connection unexpectedly")
        except OperationalError:
            log.exception("Failed to pull task from broker")
    finally:
        log.removeHandler(handler)
    [record] = records
    assert record.exc_info is None
    assert record.getMessage() == ("Failed to pull task from broker: OperationalError: "
                                   "terminating connection due to administrator command")


@pytest.mark.django_db(transaction=True)
def test_a_burst_of_late_hosts_does_not_open_a_connection_per_investigation(monkeypatch):
    """R4 for 60 late hosts whose agents answer: all stay Up (the pings were lost). Issue
    12: each investigation opened a database connection of its own (on PostgreSQL a
    fork each, ≈ 100 a second in a 1,000-host storm); now an investigator thread keeps
    its connection while more hosts wait to be investigated, and closes it when none
    does."""
    names = [f"h{i:02d}" for i in range(60)]
    w = world({"hosts": {n: {} for n in names}, "vms": {},
               "config": {"ping.interval": 1, "ping.timeout": 2}})
    Host.objects.update(last_ping=timezone.now() - dt.timedelta(seconds=30))
    wrapper = type(connections["default"])
    real = wrapper.get_new_connection
    opened = []

    def counting(self, params):
        if threading.current_thread().name.startswith("investigate"):
            opened.append(threading.current_thread().name)
        return real(self, params)

    monkeypatch.setattr(wrapper, "get_new_connection", counting)
    failures = []  # a database error drops the thread's connection (SQLite: "locked")
    real_failed = outage.failed

    def failed(where, exc, **kwargs):
        failures.append(where)
        return real_failed(where, exc, **kwargs)

    monkeypatch.setattr(outage, "failed", failed)
    loop = runtime.EngineLoop(engine_factory=lambda wid: Engine(
        agents=SimAgentClient(w.fleet), oob=SimOobClient(w.fleet), worker_id=wid))
    try:
        loop._submit_investigations(timezone.now(), config.snapshot(), newly_behind=False)
        assert wait_until(lambda: not loop.in_progress, 30)
    finally:
        loop.investigations.shutdown(wait=True)
    assert set(Host.objects.values_list("status", flat=True)) == {"Up"}
    assert Event.objects.filter(event="PingTimeout").count() == 60
    assert 1 <= len(opened) <= runtime.INVESTIGATORS + len(failures)  # not one per host
    assert len(failures) < 10
    # Idle afterwards: no investigator thread keeps a connection open.
    if connection.vendor == "postgresql":
        def others() -> int:
            with connection.cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                            "current_database() AND pid <> pg_backend_pid()")
                return cur.fetchone()[0]

        assert wait_until(lambda: others() == 0, 5), others()


def _queued_pool(w, n: int) -> runtime.WorkerPool:
    """A pool of ``n`` threads on ``w``'s fleet, every one of them queued for the claim
    (held by the caller until it releases ``pool.claiming``), as when woken together."""
    def factory(wid):
        return Engine(agents=SimAgentClient(w.fleet), oob=SimOobClient(w.fleet), worker_id=wid)

    pool = runtime.WorkerPool(factory, "test-loop")
    pool.claiming.acquire()
    pool.resize(n)
    try:
        assert wait_until(lambda: pool.queued == n, 10, 0.01)
    except BaseException:
        pool.claiming.release()
        pool.stop()
        raise
    return pool


@pytest.mark.django_db(transaction=True)
def test_a_failed_hosts_items_are_claimed_at_once_and_each_handed_to_its_own_worker(
        monkeypatch):
    """Issue 12 (R11): when a host fails, the pool's threads queued for work do not
    take their items in turn on the installation-wide claim lock, one transaction
    each: the first claims for itself and for every thread queued behind it, and
    hands those items over. Each item is worked on once, as the working thread's own
    (taken_by), and every VM is started once on another host."""
    from hadash.ha import work, worker
    from hosts.liveness import host_down

    n = 6
    w = world({"hosts": {"h1": {}, "h2": {"cpus": 64}, "h3": {"cpus": 64}},
               "vms": {f"v{i}": {"host": "h1", "ha": True} for i in range(n)},
               "config": {"ha.workers": n}})
    w.fleet.power_off("h1")
    claims: list[int] = []
    processed: list[tuple[str, str]] = []
    real_claim, real_process = work.claim_many, worker.process

    def claim_many(engine, cfg, k):
        items = real_claim(engine, cfg, k)
        if items:
            claims.append(len(items))
        return items

    def process(engine, item, cfg):
        processed.append((engine.worker_id, item.taken_by))
        real_process(engine, item, cfg)

    monkeypatch.setattr(work, "claim_many", claim_many)
    monkeypatch.setattr(worker, "process", process)
    assert host_down(Host.objects.get(name="h1"), now=timezone.now(), cfg=config.snapshot(),
                     by="test")

    pool = _queued_pool(w, n)
    try:
        pool.claiming.release()
        assert wait_until(lambda: not HaWork.objects.unfinished().exists(), 20)
    finally:
        pool.stop()
    assert claims == [n]  # one claim took them all
    assert len(processed) == n  # each item worked on once…
    assert all(wid == taken_by for wid, taken_by in processed)  # …as the worker's own
    assert len({wid for wid, _ in processed}) > 1  # by the threads it was handed to
    assert set(HaWork.objects.values_list("step", flat=True)) == {"Done"}
    starts = [c for c in w.fleet.calls if c[0] == "start"]
    assert sorted(c[2] for c in starts) == [f"v{i}" for i in range(n)]
    assert all(c[1] in ("h2", "h3") for c in starts)


@pytest.mark.django_db(transaction=True)
def test_idle_threads_woken_together_look_for_work_once_and_still_take_new_work(
        monkeypatch):
    """Issue 12 (R11): the pool's idle threads, woken together (every engine tick), ask
    the database once whether work is due — not once each in turn on the claim lock,
    a burst that delayed a HostDown and its restarts. Work announced afterwards (a
    wake-up) is still taken at once, without waiting for the next tick."""
    from hadash.ha import work
    from hosts.liveness import host_down

    n = 8
    w = world({"hosts": {"h1": {}, "h2": {"cpus": 64}},
               "vms": {"v0": {"host": "h1", "ha": True}},
               "config": {"ha.workers": n}})
    w.fleet.power_off("h1")
    looks: list[int] = []
    real_claim = work.claim_many

    def claim_many(engine, cfg, k):
        looks.append(k)
        return real_claim(engine, cfg, k)

    monkeypatch.setattr(work, "claim_many", claim_many)
    # No thread looks again on its own within this test: only wake-ups make them.
    monkeypatch.setattr(runtime.WorkerPool, "IDLE_WAIT", 60.0)

    pool = _queued_pool(w, n)
    try:
        pool.claiming.release()
        assert wait_until(lambda: pool.busy == 0 and pool.queued == 0, 10, 0.01)
        assert looks == [n]  # one look for the eight of them, nothing due
        # New work, announced: the wake-up makes them look again and take it.
        assert host_down(Host.objects.get(name="h1"), now=timezone.now(),
                         cfg=config.snapshot(), by="test")
        pool.notify()
        assert wait_until(lambda: not HaWork.objects.unfinished().exists(), 10, 0.01)
        assert len(looks) >= 2
    finally:
        pool.stop()
    assert [c[2] for c in w.fleet.calls if c[0] == "start"] == ["v0"]
