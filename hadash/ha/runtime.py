"""The engine as it runs in production: one resident engine loop in every engine
process (`manage.py qcluster`).

django-q2's scheduler wakes only every 30 s and schedules at one-minute granularity,
while detection needs a sweep at least every second (R2). So every qcluster runs an
*engine loop* of its own: a thread started in one of the cluster's worker processes
as django-q spawns it (its `post_spawn` signal; `host_resident_loop`), for the life
of that process — not a queued task, which any cluster could take (two loops queued
together used to land in one cluster, leaving no standby when it died). Each loop

- keeps a heartbeat row (`op_engine_process`), so the fleet of loops is visible;
- runs a pool of HA worker threads sized to its share of `ha.workers` among the loops
  alive (re-read every second, so an admin edit changes concurrency within seconds;
  the installation-wide cap is the claim lock in hadash.ha.work, so several loops
  never exceed it together);
- competes for the `sweeper` lease: exactly one loop holds it and runs the monitor
  sweep every second (investigations go to a small thread pool so one slow host
  never delays the others), while a detector thread beside it wakes at the moment
  the next host falls behind on ping, so detection waits neither for the next tick
  nor for a slow sweep; the loops of
  the other engine processes stand by and take over within the lease's TTL when
  the holder stops renewing it (a dead or wedged process loses it);
- lives through database outages: a broken connection costs one warning line per
  process and a reconnect (hadash.ha.outage), and an HA item whose step failed on it
  is released at once (hadash.ha.work.release_after_db_error).

The sweeper also reaps loops that stopped heartbeating (EngineLoopLost) and releases
the HA items they held. A scheduled task (`hadash.tasks.ensure_engine`, twice a
minute) raises an alert when the sweeper lease has lapsed. Nothing
depends on a clean shutdown of qcluster: leases expire, heartbeats go stale.
"""

from __future__ import annotations

import collections
import datetime as dt
import fcntl
import logging
import math
import os
import signal
import socket
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from django.db import close_old_connections, connection, transaction
from django.db.models import Q
from django.utils import timezone

from hadash import alerts, config, incidents, outage
from hadash.choices import Severity, Subject
from hadash.events import record_event
from hadash.models import EngineProcess, Lease

log = logging.getLogger("hadash.runtime")

SWEEPER = "sweeper"
SWEEPER_TTL = dt.timedelta(seconds=10)
HEARTBEAT_TTL = dt.timedelta(seconds=15)
# A loop silent this long is lost (EngineLoopLost; its HA items are released).
LOST_AFTER = 2 * HEARTBEAT_TTL
SWEEP_EVERY = 1.0
# Between sweeps the sweeper wakes when the next host falls behind, this much after.
DETECT_SLACK = 0.01
# How often the detector thread looks whether its loop became the sweeper.
DETECT_IDLE = 0.2
INVESTIGATORS = 16
# How long an investigator thread waits for the next late host before it closes its
# database connection and ends.
DRAIN_LINGER = 2.0
# How many engine processes (qclusters, one loop each) the installation runs: shown as
# "alive of wanted" in the status (API, dashboard, `manage.py engine status`).
TARGET_LOOPS = int(os.environ.get("HADASH_ENGINE_LOOPS", 1))


def new_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


# --- leases ---------------------------------------------------------------------------

def acquire(name: str, holder: str, ttl: dt.timedelta, now=None) -> tuple[bool, object]:
    """Take or renew a lease with one conditional UPDATE. Returns (held, previous
    expiry when taken over from a holder that stopped renewing, else None)."""
    now = now or timezone.now()
    Lease.objects.get_or_create(name=name)
    renewed = Lease.objects.filter(name=name, holder=holder).update(expires=now + ttl)
    if renewed:
        return True, None
    lapsed = Lease.objects.filter(name=name).filter(
        Q(expires__isnull=True) | Q(expires__lt=now)
    ).values_list("holder", "expires").first()
    if lapsed is None:
        return False, None
    taken = Lease.objects.filter(name=name, holder=lapsed[0], expires=lapsed[1]).update(
        holder=holder, expires=now + ttl
    )
    return bool(taken), (lapsed if taken and lapsed[0] else None)


def release(name: str, holder: str) -> None:
    Lease.objects.filter(name=name, holder=holder).update(holder="", expires=None)


# --- the worker pool ---------------------------------------------------------------------

def alive_loops(now=None) -> int:
    """Engine loops heartbeating and not handing over (at least this one)."""
    now = now or timezone.now()
    return max(1, EngineProcess.objects.filter(heartbeat__gte=now - HEARTBEAT_TTL,
                                               leaving=False).count())


def threads_per_loop(workers: int, loops: int) -> int:
    """Worker threads each of ``loops`` engine loops runs for an installation-wide
    ``ha.workers``: its share, rounded up — together they never hold more than
    ``workers`` items at once anyway (R11, the claim lock), and each thread keeps a
    database connection (issue 12: two engine processes with ha.workers 50 ran 100
    threads and exceeded PostgreSQL's default max_connections of 100). A loop that
    dies stops heartbeating and the others grow to the whole within HEARTBEAT_TTL; one
    that hands over does so at once."""
    return max(1, math.ceil(workers / max(1, loops)))


class WorkerPool:
    """Threads that claim and process HA work; resized to ha.workers on the fly.

    One thread of the pool claims at a time, for itself and for every thread queued
    behind it (issue 12): when a host fails, its ten items are taken in one claim
    instead of ten claims in turn on the installation-wide claim lock (R11), each a
    transaction of its own. The others are handed over in the process (`handed`);
    each takes its item over (`work.hand_over`) before working on it."""

    IDLE_WAIT = 1.0  # seconds an idle thread waits for a wake-up before it looks again

    def __init__(self, engine_factory, loop_id: str):
        self.engine_factory = engine_factory
        self.loop_id = loop_id
        self.threads: dict[int, threading.Thread] = {}
        self.stops: dict[int, threading.Event] = {}
        self.wake = threading.Condition()
        self.busy = 0
        self._lock = threading.Lock()
        self.claiming = threading.Lock()  # one claim of this pool at a time
        self.queued = 0  # threads waiting for `claiming`
        self.handed: collections.deque = collections.deque()  # claimed for the queued
        # Wake-ups so far (`notify`), and the last claim that found nothing: when it
        # began (monotonic) and how many wake-ups there had been. A thread that queued
        # for `claiming` before that claim began, with no wake-up since, would only ask
        # the database the same question again (`next_item`).
        self.notified = 0
        self._empty: tuple[float, int] = (-math.inf, -1)

    def resize(self, n: int) -> None:
        """Run exactly threads 0..n-1; higher ones finish their item and stop. Wakes
        the workers when that changed anything (the engine loop calls it every tick)."""
        changed = False
        for i, t in list(self.threads.items()):
            if not t.is_alive():
                del self.threads[i], self.stops[i]
        for i, stop in self.stops.items():
            if i >= n:
                changed = changed or not stop.is_set()
                stop.set()
            elif stop.is_set():
                changed = True
                stop.clear()  # asked to stop before, wanted again: keep it
        for i in range(n):
            if i not in self.threads:
                stop = threading.Event()
                t = threading.Thread(target=self._run, args=(i, stop), daemon=True,
                                     name=f"ha-worker-{i}")
                self.threads[i], self.stops[i] = t, stop
                t.start()
                changed = True
        if changed:
            self.notify()

    def notify(self) -> None:
        with self.wake:
            self.notified += 1
            self.wake.notify_all()

    def has_idle(self) -> bool:
        """Whether a worker waits for work (is not in a step)."""
        with self._lock:
            return self.busy < len(self.threads)

    def step(self, engine) -> bool:
        """Take one item — handed over, or claimed (with those for the threads queued
        behind) — and process it. False when there was none."""
        from hadash.ha.worker import process

        cfg = config.snapshot()
        item = self.next_item(engine, cfg)
        if item is None:
            return False
        process(engine, item, cfg)
        return True

    def next_item(self, engine, cfg):
        from hadash.ha.work import claim_many

        item = self._take_handed(engine)
        if item is not None:
            return item
        with self._lock:
            self.queued += 1
            entered = time.monotonic()
        queued = True
        try:
            with self.claiming:
                with self._lock:
                    self.queued -= 1
                    queued = False
                item = self._take_handed(engine)
                if item is not None:
                    return item
                with self._lock:
                    behind = self.queued
                    began, notified = time.monotonic(), self.notified
                    if self._empty[0] >= entered and self._empty[1] == notified:
                        # A claim that began after we queued found nothing, and no
                        # work was announced since (issue 12: the pool's twenty idle
                        # threads woke together every tick and asked one after the
                        # other — twenty queries a second, in a burst that could meet
                        # a host's HostDown and delay its restarts).
                        return None
                items = claim_many(engine, cfg, 1 + behind)
                if len(items) < 1 + behind:
                    # Everything due (within ha.workers) was taken: nothing left for
                    # the threads queued before this claim began.
                    with self._lock:
                        self._empty = (began, notified)
                if len(items) > 1:
                    with self._lock:
                        self.handed.extend(items[1:])
        finally:
            if queued:
                with self._lock:
                    self.queued -= 1
        return items[0] if items else None

    def _take_handed(self, engine):
        from hadash.ha.work import hand_over

        while True:
            with self._lock:
                if not self.handed:
                    return None
                item = self.handed.popleft()
            if hand_over(item, engine.worker_id):
                return item
            log.info("work #%s was released before it was handed over; left to others",
                     item.pk)

    def release_handed(self, engine) -> int:
        """Give back items claimed for threads that did not take them (stopping)."""
        from hadash.ha.work import release_claim

        n = 0
        while True:
            with self._lock:
                if not self.handed:
                    return n
                item = self.handed.popleft()
            n += release_claim((item.pk, item.taken_by, item.taken), now=engine.now(),
                               after=0, message="engine worker pool stopping")

    def _run(self, i: int, stop: threading.Event) -> None:
        from hadash.ha.work import release_held_by

        engine = self.engine_factory(f"{self.loop_id}/w{i}")
        unsure = False  # a claim may have committed while our connection broke
        try:
            while not stop.is_set():
                try:
                    if unsure:
                        release_held_by(engine.worker_id, now=engine.now(),
                                        message="database connection lost while claiming; "
                                                "tried again at once")
                        unsure = False
                    with self._lock:
                        self.busy += 1
                    try:
                        did = self.step(engine)
                    finally:
                        with self._lock:
                            self.busy -= 1
                    outage.ok()
                except outage.DB_ERRORS as exc:
                    outage.failed(f"HA worker {i}", exc)
                    did, unsure = False, True
                except Exception:
                    log.exception("HA worker %s failed a step", i)
                    did = False
                    close_old_connections()
                if not did:
                    with self.wake:
                        self.wake.wait(timeout=self.IDLE_WAIT)
        finally:
            connection.close()

    def stop(self, timeout: float = 30.0) -> None:
        for s in self.stops.values():
            s.set()
        self.notify()
        deadline = time.monotonic() + timeout
        for t in self.threads.values():
            t.join(max(0.0, deadline - time.monotonic()))
        if self.handed:
            try:
                self.release_handed(self.engine_factory(f"{self.loop_id}/stop"))
            except Exception:
                log.exception("could not give back the items claimed for other workers")
            finally:
                connection.close()


# --- the loop -------------------------------------------------------------------------------

class EngineLoop:
    def __init__(self, engine_factory=None, lifetime: float = math.inf,
                 stopping: threading.Event | None = None, keep_running=None):
        from hadash.ha.engine import Engine

        self.id = new_id()
        self.engine_factory = engine_factory or (lambda wid: Engine.production(worker_id=wid))
        self.engine = self.engine_factory(f"{self.id}/sweeper")
        self.lifetime = lifetime
        # Checked every second besides `stopping`: False ends the loop (a worker
        # process whose cluster died under it stops its loop).
        self.keep_running = keep_running or (lambda: True)
        self.pool = WorkerPool(self.engine_factory, self.id)
        self.investigations = ThreadPoolExecutor(INVESTIGATORS, thread_name_prefix="investigate")
        self.in_progress: set[int] = set()  # hosts submitted, until investigated
        self.waiting: collections.deque = collections.deque()  # (host, cfg) not taken yet
        self.drainers = 0  # tasks of `investigations` taking from `waiting`
        self.idle_drainers = 0  # of those, waiting for a host (DRAIN_LINGER at most)
        self.in_progress_lock = threading.Lock()
        self.more_waiting = threading.Condition(self.in_progress_lock)
        self.is_sweeper = False
        self.cfg = None  # the configuration of the loop's last step (the detector's)
        self.ended = threading.Event()  # run() is over: the detector thread ends too
        self.registered = False
        self.stopping = stopping or threading.Event()
        # When this loop last could not reach the database (or started): it reaps
        # other loops only once it has been in touch for longer than they may be
        # silent — after an outage every loop's heartbeat is stale, not lost.
        self.out_of_touch = time.monotonic()

    def stop(self) -> None:
        """Ask the loop to end (it hands the sweeper lease over)."""
        self.stopping.set()

    # heartbeat
    def register(self) -> None:
        now = timezone.now()
        EngineProcess.objects.update_or_create(
            id=self.id, defaults=dict(host=socket.gethostname(), pid=os.getpid(), started=now,
                                      heartbeat=now, leaving=False),
        )
        self.registered = True
        loops_back(now)

    def heartbeat(self, workers: int) -> None:
        if not EngineProcess.objects.filter(id=self.id).update(
            heartbeat=timezone.now(), sweeper=self.is_sweeper, workers=workers,
            busy=self.pool.busy,
        ):
            # Reaped as lost while it could not heartbeat (a stopped process, a long
            # database outage): its items were released; it is alive, so it is back.
            log.warning("engine loop %s had been reaped as lost; registering again", self.id)
            self.register()

    # sweeping
    def sweep(self, cfg):
        """The full sweep (R2–R5, the brake, maintenance, cleanup). Returns when the
        next host falls behind on ping (or None)."""
        from hadash.ha import cleanup

        now = self.engine.now()
        if alerts.is_open(STALLED, Subject.ENGINE, SWEEPER):
            with transaction.atomic():  # R19: the sweeper runs again
                alerts.resolve_alert(STALLED, Subject.ENGINE, SWEEPER, now=timezone.now(),
                                     message=f"The sweeper runs again ({self.id})")
        # R18: hosts on time again with their incident still Open are dismissed.
        from hosts.liveness import behind_cutoff

        incidents.dismiss_returned_hosts(now=now, cutoff=behind_cutoff(now, cfg))
        self._submit_investigations(now, cfg, newly_behind=False)
        self.engine.cluster_checks(now=now, cfg=cfg)
        cleanup.cleanup_step(self.engine, cfg=cfg)
        in_touch = time.monotonic() - self.out_of_touch
        if in_touch > LOST_AFTER.total_seconds() and reap_lost_loops():
            self.pool.notify()  # their HA items are free now
        return self._next_due(cfg)

    def detect(self, cfg):
        """Between sweeps: investigate hosts that have just fallen behind (R2).
        Returns when the next one falls behind (or None)."""
        self._submit_investigations(self.engine.now(), cfg, newly_behind=True)
        return self._next_due(cfg)

    def _next_due(self, cfg):
        from hosts.liveness import next_falls_behind

        return next_falls_behind(self.engine.now(), cfg)

    def _submit_investigations(self, now, cfg, *, newly_behind: bool) -> None:
        from hosts.liveness import hosts_to_investigate

        for host in hosts_to_investigate(now, cfg, newly_behind=newly_behind):
            with self.in_progress_lock:
                if host.pk in self.in_progress:
                    continue
                self.in_progress.add(host.pk)
                self.waiting.append((host, cfg))
                if self.idle_drainers:
                    self.more_waiting.notify()
                    continue
                if self.drainers >= INVESTIGATORS:
                    continue  # a busy drainer takes it next
                self.drainers += 1
            self.investigations.submit(self._drain)

    def _drain(self) -> None:
        """Investigate waiting hosts, on one database connection, until none has come
        for DRAIN_LINGER seconds (issue 12: in a storm of late hosts each
        investigation opened — and PostgreSQL forked — a connection of its own, ≈ 100
        a second, and the forks took the CPU the pings needed). The connection is
        closed when the drainer stops, so an idle engine holds none for them."""
        try:
            while True:
                with self.in_progress_lock:
                    if not self.waiting:
                        self.idle_drainers += 1
                        self.more_waiting.wait(DRAIN_LINGER)
                        self.idle_drainers -= 1
                        if not self.waiting:
                            self.drainers -= 1
                            return
                    host, cfg = self.waiting.popleft()
                self._investigate(host, cfg)
        finally:
            connection.close()

    def _investigate(self, host, cfg) -> None:
        from hosts.liveness import check_host

        now = self.engine.now()
        try:
            if check_host(self.engine, host, now=now, cfg=cfg):
                # It acted — if the host went Down, its HA work is waiting now.
                self.pool.notify()
        except outage.DB_ERRORS as exc:
            outage.failed(f"investigating {host.name}", exc)
            self._drop_claim(host, now)
        except Exception:
            log.exception("investigating %s failed", host.name)
            connection.close()  # whatever state it was left in: the next one reconnects
        finally:
            with self.in_progress_lock:
                self.in_progress.discard(host.pk)

    def _drop_claim(self, host, now, patience: float = 10.0) -> None:
        """After a broken connection: give the host back to the next sweep, not when
        its investigation claim lapses a minute later (a few tries, then that)."""
        from hosts.liveness import drop_claim

        deadline, wait = time.monotonic() + patience, 0.2
        while not self.stopping.is_set():
            try:
                drop_claim(host, now)
                return
            except outage.DB_ERRORS as exc:
                outage.failed(f"investigating {host.name}", exc)
                if time.monotonic() + wait > deadline:
                    return
                self.stopping.wait(wait)
                wait *= 2

    def detect_loop(self) -> None:
        """The detector thread (R2): while this loop holds the sweeper lease, wake the
        moment the next host falls behind on ping and investigate it at once. It runs
        beside the sweep, so a slow sweep (failover plans recomputed after a failure,
        cleanup, a loaded database) never delays detection — when the sweep's own
        thread did this between sweeps, a host that fell behind during a long sweep
        was found only after it (0.8 s late in bench detect). It looks again at least
        every SWEEP_EVERY (new hosts, a changed ping.interval)."""
        try:
            while not (self.stopping.is_set() or self.ended.is_set()):
                cfg = self.cfg
                if not self.is_sweeper or cfg is None:
                    self.stopping.wait(DETECT_IDLE)
                    continue
                try:
                    due = self._next_due(cfg)
                    delay = SWEEP_EVERY if due is None else min(
                        SWEEP_EVERY, (due - self.engine.now()).total_seconds() + DETECT_SLACK)
                    if self.stopping.wait(max(0.0, delay)):
                        return
                    if self.is_sweeper:
                        self.detect(self.cfg or cfg)
                except outage.DB_ERRORS as exc:
                    outage.failed(f"engine loop {self.id} detection", exc)
                    self.stopping.wait(DETECT_IDLE * 5)
                except Exception:
                    log.exception("engine loop %s detection pass failed", self.id)
                    close_old_connections()
                    self.stopping.wait(DETECT_IDLE * 5)
        finally:
            connection.close()

    def take_sweeper(self) -> None:
        with transaction.atomic():  # a takeover is committed with its alert
            held, previous = acquire(SWEEPER, self.id, SWEEPER_TTL)
            if previous:
                holder, expires = previous
                silent = (timezone.now() - expires + SWEEPER_TTL).total_seconds() \
                    if expires else 0
                # R19, our call: a takeover is the recovery itself — a warning event,
                # not an alert (EngineStalled is the alert while nobody sweeps).
                record_event(
                    Subject.ENGINE, None, name=SWEEPER, event="SweeperTakeover",
                    severity=Severity.WARNING, old=holder[:255], new=self.id,
                    message=f"Sweeper {holder} stopped renewing its lease "
                            f"({silent:.0f} s without a sweep); {self.id} took over",
                )
        if held and not self.is_sweeper:
            log.info("engine loop %s is the sweeper", self.id)
        self.is_sweeper = held

    def start_side_loops(self) -> None:
        """R20: notification deliveries are sent beside HA work, in a thread of their
        own, so a slow or dead receiver never delays HA (notify.sender). On PostgreSQL
        a listener wakes the workers when another process schedules HA work
        (hadash.ha.wakeup)."""
        from django.apps import apps

        from hadash.ha import wakeup

        wakeup.start(self.stopping, self.pool.notify, name=f"ha-wakeup-{self.id}",
                     wanted=self.pool.has_idle)
        if not apps.is_installed("notify"):
            return
        from notify.sender import run_sender

        threading.Thread(target=run_sender, args=(self.stopping, self.id),
                         name=f"notify-{self.id}", daemon=True).start()

    def run(self) -> str:
        """Run until stopped (or `lifetime` seconds); then hand over."""
        deadline = time.monotonic() + self.lifetime
        self.start_side_loops()
        threading.Thread(target=self.detect_loop, name=f"detect-{self.id}",
                         daemon=True).start()
        try:
            while (time.monotonic() < deadline and not self.stopping.is_set()
                   and self.keep_running()):
                started = time.monotonic()
                try:
                    if not self.registered:
                        self.register()
                    cfg = self.cfg = config.snapshot()
                    workers = threads_per_loop(cfg["ha.workers"], alive_loops())
                    self.pool.resize(workers)
                    self.take_sweeper()
                    if self.is_sweeper:
                        self.sweep(cfg)
                    self.pool.notify()
                    self.heartbeat(workers)
                    outage.ok()
                except outage.DB_ERRORS as exc:
                    outage.failed(f"engine loop {self.id}", exc)
                    self.out_of_touch = time.monotonic()
                except Exception:
                    log.exception("engine loop %s step failed", self.id)
                    close_old_connections()
                self.stopping.wait(max(0.0, started + SWEEP_EVERY - time.monotonic()))
            return "stopped" if self.stopping.is_set() else "lifetime over"
        finally:
            self.leave()

    def leave(self) -> None:
        """Hand over: release the sweeper lease, stop the workers, deregister."""
        try:
            EngineProcess.objects.filter(id=self.id).update(leaving=True)
            release(SWEEPER, self.id)
        except outage.DB_ERRORS as exc:
            outage.failed(f"engine loop {self.id} handing over", exc)
        except Exception:
            log.exception("engine loop %s could not hand over", self.id)
        self.is_sweeper = False
        self.ended.set()
        self.pool.stop()
        self.investigations.shutdown(wait=False, cancel_futures=True)
        try:
            EngineProcess.objects.filter(id=self.id).delete()
        except outage.DB_ERRORS as exc:
            outage.failed(f"engine loop {self.id} leaving", exc)
        finally:
            connection.close()


# --- one resident loop per engine process ------------------------------------------------

_resident: dict = {}


def host_resident_loop() -> bool:
    """django-q's `post_spawn` (hadash.models connects it), in each worker process of
    a qcluster as the cluster spawns or reincarnates it: the first one to take the
    cluster's lock file runs the cluster's engine loop, in a thread, for as long as
    the process lives. Returns whether this process hosts it."""
    if _resident:
        return True
    lock = _cluster_lock(os.getppid())
    if lock is None:
        return False  # another worker process of this cluster hosts it
    fd, path = lock
    stop = threading.Event()
    parent = os.getppid()
    thread = threading.Thread(
        target=run_resident, args=(stop, lambda: os.getppid() == parent),
        name="engine-loop", daemon=True,
    )
    _resident.update(fd=fd, path=path, stop=stop, thread=thread)
    thread.start()
    # A worker that ends on its own (django-q recycles workers; qcluster's stop) or is
    # told to (SIGTERM: a supervisor stopping the engine process's group) hands the
    # sweeper lease over instead of letting it lapse.
    from multiprocessing.util import Finalize

    Finalize(None, stop_resident, exitpriority=100)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _hand_over_and_die)
    return True


def _hand_over_and_die(signum, frame) -> None:
    stop_resident(timeout=3.0)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _cluster_lock(parent: int):
    """An exclusive lock on a file named after the cluster's sentinel process (its
    pid and start time): held for the life of the worker process, dropped by the
    kernel when it dies however it dies. (fd, path), or None when taken."""
    try:
        stat = Path(f"/proc/{parent}/stat").read_text()
        started = stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = "0"
    path = Path(tempfile.gettempdir()) / f"hadash-engine-{os.getuid()}-{parent}-{started}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd, path


def run_resident(stop: threading.Event, keep_running) -> None:
    """The engine loop of this process, restarted should it ever fail as a whole."""
    wait = 1.0
    while not stop.is_set() and keep_running():
        loop = EngineLoop(stopping=stop, keep_running=keep_running)
        log.info("engine loop %s started in pid %s", loop.id, os.getpid())
        try:
            loop.run()
            wait = 1.0
        except Exception:
            log.exception("engine loop %s failed; starting another", loop.id)
        stop.wait(wait)
        wait = min(wait * 2, 30.0)
    if not stop.is_set():
        log.warning("engine loop of pid %s stopped: its django-q cluster is gone",
                    os.getpid())


def stop_resident(timeout: float = 8.0) -> None:
    """End this process's engine loop, handing the sweeper lease over."""
    if not _resident:
        return
    _resident["stop"].set()
    _resident["thread"].join(timeout)
    try:
        _resident["path"].unlink(missing_ok=True)
        os.close(_resident["fd"])
    except OSError:
        pass
    _resident.clear()


# --- health ------------------------------------------------------------------------------------

def status(now=None) -> dict:
    """What the engine is doing, for operators (API, dashboard, `manage.py engine`)."""
    now = now or timezone.now()
    lease = Lease.objects.filter(name=SWEEPER).first()
    loops = list(EngineProcess.objects.order_by("started").values())
    for p in loops:
        p["alive"] = p["heartbeat"] >= now - HEARTBEAT_TTL
    sweeper_ok = bool(lease and lease.holder and lease.expires and lease.expires >= now)
    return {
        "sweeper": {
            "holder": lease.holder if lease else "",
            "expires": lease.expires if lease else None,
            "healthy": sweeper_ok,
        },
        "loops": loops,
        "alive_loops": sum(1 for p in loops if p["alive"]),
        "target_loops": TARGET_LOOPS,
    }


STALLED = "EngineStalled"
LOOP_LOST = "EngineLoopLost"


def loops_back(now) -> int:
    """R19: open EngineLoopLost alerts resolve once as many loops are alive as the
    installation runs (a replacement registered). Returns how many resolved."""
    from hadash.choices import AlertState
    from hadash.models import Alert

    lost = list(Alert.objects.filter(kind=LOOP_LOST, state=AlertState.OPEN)
                .values_list("subject_name", flat=True))
    if not lost:
        return 0
    alive = EngineProcess.objects.filter(heartbeat__gte=now - HEARTBEAT_TTL).count()
    if alive < TARGET_LOOPS:
        return 0
    with transaction.atomic():
        for name in lost:
            alerts.resolve_alert(LOOP_LOST, Subject.ENGINE, name, now=now,
                                 message=f"Engine loop {name} replaced: {alive} loop(s) "
                                         "alive")
    return len(lost)


def check_stall(now=None) -> bool:
    """Raise one alert when nobody holds a fresh sweeper lease (resolved when the
    sweeper runs again, R19). Returns True when the engine is stalled."""
    now = now or timezone.now()
    st = status(now)
    if st["sweeper"]["healthy"]:
        if alerts.is_open(STALLED, Subject.ENGINE, SWEEPER):
            with transaction.atomic():
                alerts.resolve_alert(STALLED, Subject.ENGINE, SWEEPER, now=now,
                                     message=f"The sweeper runs again ({st['sweeper']['holder']})")
        return False
    with transaction.atomic():
        # One alert per stall: remember it on the lease row.
        lease, _ = Lease.objects.select_for_update().get_or_create(name=SWEEPER)
        if lease.last_run and (lease.expires is None or lease.last_run >= lease.expires):
            return True
        lease.last_run = now
        lease.save(update_fields=["last_run"])
        text = ("No engine loop holds the sweeper lease: hosts are not being watched. "
                f"{st['alive_loops']} live loop(s); check the engine processes "
                "(manage.py qcluster).")
        record_event(Subject.ENGINE, None, name=SWEEPER, event=STALLED,
                     severity=Severity.CRITICAL, message=text, now=now)
        alerts.open_alert(STALLED, Subject.ENGINE, SWEEPER, now=now,
                          severity=Severity.CRITICAL, title="Engine stalled: no sweeper",
                          message=text)
    return True


def reap_lost_loops(now=None) -> list[str]:
    """Loops whose heartbeat stopped (a killed or wedged process): one alert each,
    naming the HA items they still held, which are released with it — retaken by
    another worker at once, not when their 5-minute lease lapses (R11). Their rows go.
    Returns the loops reaped. The sweeper calls it, once it has itself been in touch
    with the database for LOST_AFTER."""
    from hadash.choices import FINAL_STEPS
    from hadash.ha.work import release_claim
    from hadash.models import HaWork

    now = now or timezone.now()
    lost = list(EngineProcess.objects.filter(heartbeat__lt=now - LOST_AFTER))
    reaped = []
    for p in lost:
        with transaction.atomic():
            if not EngineProcess.objects.filter(id=p.id, heartbeat=p.heartbeat).delete()[0]:
                continue  # it came back meanwhile, or another reaper was first
            held = list(HaWork.objects.exclude(step__in=FINAL_STEPS)
                        .filter(taken_by__startswith=f"{p.id}/")
                        .values_list("pk", "taken_by", "taken", "instance__name"))
            silent = int((now - p.heartbeat).total_seconds())
            what = (f"; HA work of {', '.join(h[3] for h in held)} released to other "
                    "workers" if held else "")
            text = (f"Engine loop {p.id} (pid {p.pid} on {p.host}) stopped heartbeating "
                    f"{silent} s ago{'' if p.leaving else ' without handing over'}{what}")
            record_event(
                Subject.ENGINE, None, name=p.id, event=LOOP_LOST,
                severity=Severity.WARNING, old="alive", new="lost", now=now, message=text,
            )
            # R19: one alert per lost loop, resolved when a replacement is alive.
            alerts.open_alert(LOOP_LOST, Subject.ENGINE, p.id, now=now,
                              severity=Severity.WARNING,
                              title=f"Engine loop {p.id} lost", message=text)
            for pk, taken_by, taken, _name in held:
                release_claim((pk, taken_by, taken), now=now, after=0,
                              message=f"its engine loop {p.id} was lost; released")
        reaped.append(p.id)
    return reaped
