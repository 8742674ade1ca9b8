"""The engine as it runs in production: leased loops inside the django-q cluster.

django-q2's scheduler wakes only every 30 s and schedules at one-minute granularity,
while detection needs a sweep at least every second (R2). So the cluster runs
*engine loops*: long-lived django-q tasks (shorter than the task timeout, which is
shorter than the broker's retry) that each

- keep a heartbeat row (`op_engine_process`) fresh, so the fleet of loops is visible;
- run a pool of HA worker threads sized to `ha.workers` (re-read every second, so an
  admin edit changes concurrency within seconds; the installation-wide cap is the
  claim lock in hadash.ha.work, so several loops never exceed it together);
- compete for the `sweeper` lease: exactly one loop holds it and runs the monitor
  sweep every second (investigations go to a small thread pool so one slow host
  never delays the others) and, between sweeps, wakes at the moment the next host
  falls behind on ping, so detection does not wait for the next tick; the others
  stand by and take over within the lease's
  TTL when the holder stops renewing it (a dead or wedged process loses it);
- before their lifetime ends, enqueue a successor and hand the lease over.

A scheduled task (`hadash.tasks.ensure_engine`, every minute) tops the loops up to
`HADASH_ENGINE_LOOPS` and raises an alert when the sweeper lease has lapsed. Nothing
depends on a clean shutdown of qcluster: leases expire, heartbeats go stale.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from django.db import close_old_connections, connection, transaction
from django.db.models import Q
from django.utils import timezone

from hadash import config
from hadash.choices import Severity, Subject
from hadash.events import record_event
from hadash.models import EngineProcess, Lease

log = logging.getLogger("hadash.runtime")

SWEEPER = "sweeper"
SWEEPER_TTL = dt.timedelta(seconds=10)
HEARTBEAT_TTL = dt.timedelta(seconds=15)
LOOP_LIFETIME = float(os.environ.get("HADASH_LOOP_LIFETIME", 240))  # < Q_CLUSTER timeout
SWEEP_EVERY = 1.0
# Between sweeps the sweeper wakes when the next host falls behind, this much after.
DETECT_SLACK = 0.01
INVESTIGATORS = 16
TARGET_LOOPS = int(os.environ.get("HADASH_ENGINE_LOOPS", 2))


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

class WorkerPool:
    """Threads that claim and process HA work; resized to ha.workers on the fly."""

    def __init__(self, engine_factory, loop_id: str):
        self.engine_factory = engine_factory
        self.loop_id = loop_id
        self.threads: dict[int, threading.Thread] = {}
        self.stops: dict[int, threading.Event] = {}
        self.wake = threading.Condition()
        self.busy = 0
        self._lock = threading.Lock()

    def resize(self, n: int) -> None:
        """Run exactly threads 0..n-1; higher ones finish their item and stop."""
        for i, t in list(self.threads.items()):
            if not t.is_alive():
                del self.threads[i], self.stops[i]
        for i, stop in self.stops.items():
            if i >= n:
                stop.set()
            else:
                stop.clear()  # asked to stop before, wanted again: keep it
        for i in range(n):
            if i not in self.threads:
                stop = threading.Event()
                t = threading.Thread(target=self._run, args=(i, stop), daemon=True,
                                     name=f"ha-worker-{i}")
                self.threads[i], self.stops[i] = t, stop
                t.start()
        self.notify()

    def notify(self) -> None:
        with self.wake:
            self.wake.notify_all()

    def _run(self, i: int, stop: threading.Event) -> None:
        from hadash.ha.work import worker_step

        engine = self.engine_factory(f"{self.loop_id}/w{i}")
        try:
            while not stop.is_set():
                try:
                    with self._lock:
                        self.busy += 1
                    try:
                        did = worker_step(engine)
                    finally:
                        with self._lock:
                            self.busy -= 1
                except Exception:
                    log.exception("HA worker %s failed a step", i)
                    did = False
                    close_old_connections()
                if not did:
                    with self.wake:
                        self.wake.wait(timeout=1.0)
        finally:
            connection.close()

    def stop(self, timeout: float = 30.0) -> None:
        for s in self.stops.values():
            s.set()
        self.notify()
        deadline = time.monotonic() + timeout
        for t in self.threads.values():
            t.join(max(0.0, deadline - time.monotonic()))


# --- the loop -------------------------------------------------------------------------------

class EngineLoop:
    def __init__(self, engine_factory=None, lifetime: float = LOOP_LIFETIME,
                 target: int = TARGET_LOOPS, successor=None):
        from hadash.ha.engine import Engine

        self.id = new_id()
        self.engine_factory = engine_factory or (lambda wid: Engine.production(worker_id=wid))
        self.engine = self.engine_factory(f"{self.id}/sweeper")
        self.lifetime = lifetime
        self.target = target
        self.successor = successor
        self.pool = WorkerPool(self.engine_factory, self.id)
        self.investigations = ThreadPoolExecutor(INVESTIGATORS, thread_name_prefix="investigate")
        self.in_progress: set[int] = set()
        self.in_progress_lock = threading.Lock()
        self.is_sweeper = False
        self.stopping = threading.Event()

    def stop(self) -> None:
        """Ask the loop to end (it hands over as at the end of its lifetime)."""
        self.stopping.set()

    # heartbeat
    def register(self) -> bool:
        """Register; False when enough loops already run (then this one leaves)."""
        now = timezone.now()
        EngineProcess.objects.create(
            id=self.id, host=socket.gethostname(), pid=os.getpid(), started=now, heartbeat=now
        )
        live = EngineProcess.objects.filter(
            heartbeat__gte=now - HEARTBEAT_TTL, leaving=False
        ).order_by("started", "id").values_list("id", flat=True)
        if self.id not in list(live)[: self.target]:
            EngineProcess.objects.filter(id=self.id).delete()
            return False
        return True

    def heartbeat(self, workers: int) -> None:
        EngineProcess.objects.filter(id=self.id).update(
            heartbeat=timezone.now(), sweeper=self.is_sweeper, workers=workers,
            busy=self.pool.busy,
        )

    # sweeping
    def sweep(self, cfg):
        """The full sweep (R2–R5, the brake, maintenance, cleanup). Returns when the
        next host falls behind on ping (or None)."""
        from hadash.ha import brake, cleanup, maintenance

        now = self.engine.now()
        self._submit_investigations(now, cfg, newly_behind=False)
        brake.update_all(now=now, cfg=cfg)
        maintenance.complete_ready_hosts(now=now)
        cleanup.cleanup_step(self.engine, cfg=cfg)
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
            self.investigations.submit(self._investigate, host, cfg)

    def _investigate(self, host, cfg) -> None:
        from hosts.liveness import check_host

        try:
            if check_host(self.engine, host, now=self.engine.now(), cfg=cfg):
                # It acted — if the host went Down, its HA work is waiting now.
                self.pool.notify()
        except Exception:
            log.exception("investigating %s failed", host.name)
        finally:
            with self.in_progress_lock:
                self.in_progress.discard(host.pk)
            connection.close()

    def wait_detecting(self, due, until: float, cfg) -> None:
        """Wait until the monotonic time `until`; while sweeping, wake whenever the
        next host falls behind on ping and look for it at once."""
        while self.is_sweeper and due is not None and not self.stopping.is_set():
            delay = (due - self.engine.now()).total_seconds() + DETECT_SLACK
            if time.monotonic() + delay >= until:
                break
            if self.stopping.wait(max(0.0, delay)):
                return
            try:
                due = self.detect(cfg)
            except Exception:
                log.exception("engine loop %s detection pass failed", self.id)
                close_old_connections()
                break
        self.stopping.wait(max(0.0, until - time.monotonic()))

    def take_sweeper(self) -> None:
        held, previous = acquire(SWEEPER, self.id, SWEEPER_TTL)
        if held and not self.is_sweeper:
            log.info("engine loop %s is the sweeper", self.id)
            if previous:
                holder, expires = previous
                silent = (timezone.now() - expires + SWEEPER_TTL).total_seconds() \
                    if expires else 0
                with transaction.atomic():
                    record_event(
                        Subject.ENGINE, None, name=SWEEPER, event="SweeperTakeover",
                        alert=True, severity=Severity.WARNING, old=holder[:255],
                        new=self.id,
                        message=f"Sweeper {holder} stopped renewing its lease "
                                f"({silent:.0f} s without a sweep); {self.id} took over",
                    )
        self.is_sweeper = held

    def run(self) -> str:
        if not self.register():
            log.info("engine loop %s not needed (%s loops run)", self.id, self.target)
            return "not needed"
        deadline = time.monotonic() + self.lifetime
        try:
            while time.monotonic() < deadline and not self.stopping.is_set():
                started = time.monotonic()
                cfg, due = None, None
                try:
                    cfg = config.snapshot()
                    workers = cfg["ha.workers"]
                    self.pool.resize(workers)
                    self.take_sweeper()
                    if self.is_sweeper:
                        due = self.sweep(cfg)
                    self.pool.notify()
                    self.heartbeat(workers)
                except Exception:
                    log.exception("engine loop %s step failed", self.id)
                    close_old_connections()
                self.wait_detecting(due, started + SWEEP_EVERY, cfg)
            return "lifetime over"
        finally:
            self.leave()

    def leave(self) -> None:
        """Hand over: mark leaving, start a successor, release the sweeper lease."""
        try:
            EngineProcess.objects.filter(id=self.id).update(leaving=True)
            if self.successor:
                self.successor()
            release(SWEEPER, self.id)
        except Exception:
            log.exception("engine loop %s could not hand over", self.id)
        self.pool.stop()
        self.investigations.shutdown(wait=False, cancel_futures=True)
        try:
            EngineProcess.objects.filter(id=self.id).delete()
        finally:
            connection.close()


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


def check_stall(now=None) -> bool:
    """Raise one alert when nobody holds a fresh sweeper lease. Returns True when
    the engine is stalled."""
    now = now or timezone.now()
    st = status(now)
    if st["sweeper"]["healthy"]:
        return False
    with transaction.atomic():
        # One alert per stall: remember it on the lease row.
        lease, _ = Lease.objects.select_for_update().get_or_create(name=SWEEPER)
        if lease.last_run and (lease.expires is None or lease.last_run >= lease.expires):
            return True
        lease.last_run = now
        lease.save(update_fields=["last_run"])
        record_event(
            Subject.ENGINE, None, name=SWEEPER, event="EngineStalled", alert=True,
            message="No engine loop holds the sweeper lease: hosts are not being watched. "
                    f"{st['alive_loops']} live loop(s); check the django-q cluster(s).",
            now=now,
        )
    return True


def reap_lost_loops(now=None) -> list[str]:
    """Loops whose heartbeat stopped (a killed or wedged process): one alert each,
    naming the HA items they still hold (retaken when their 5-minute lease lapses,
    R11), then their rows go. Returns the loops reaped."""
    from hadash.choices import FINAL_STEPS
    from hadash.models import HaWork

    now = now or timezone.now()
    lost = list(EngineProcess.objects.filter(heartbeat__lt=now - 2 * HEARTBEAT_TTL))
    for p in lost:
        held = list(HaWork.objects.exclude(step__in=FINAL_STEPS)
                    .filter(taken_by__startswith=f"{p.id}/")
                    .values_list("instance__name", flat=True))
        with transaction.atomic():
            if not EngineProcess.objects.filter(id=p.id, heartbeat=p.heartbeat).delete()[0]:
                continue  # it came back meanwhile
            silent = int((now - p.heartbeat).total_seconds())
            what = (f"; HA work of {', '.join(held)} is retaken when its lease lapses"
                    if held else "")
            record_event(
                Subject.ENGINE, None, name=p.id, event="EngineLoopLost", alert=True,
                severity=Severity.WARNING, old="alive", new="lost", now=now,
                message=f"Engine loop {p.id} (pid {p.pid} on {p.host}) stopped "
                        f"heartbeating {silent} s ago{'' if p.leaving else ' without handing over'}"
                        f"{what}",
            )
    return [p.id for p in lost]
