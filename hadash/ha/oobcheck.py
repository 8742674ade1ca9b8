"""BMC checks (SPEC R28): every `oob.check.interval` (300 s) each host's BMC is asked
for its system: reachable, credentials accepted, power On. A failing check opens an
alert of kind ``bmc-check-failed`` for its host (hosts.hastatus.BMC_CHECK_ALERT, its
title the reason) — before any incident — and the host's HA VMs are then ``at-risk``
(R17, read from that alert); the alert resolves when a check passes again.

The sweeper calls `BmcChecker.run_due` from every sweep (Engine.cluster_checks). It
never blocks the sweep: in production the checks run on a small thread pool (each
bounded by the Redfish client's timeouts) and a host is never checked twice at once;
the scenario runner and tests run them inline on the virtual clock. Checks are spread
over the interval: a host first seen is checked at a stable offset within it (from its
name), then every interval after its last check.

Hosts without a BMC configured are not checked (their HA status already says at-risk:
"no BMC configured"); nor are Down or Removed hosts (a Down host's BMC reporting Off
is the expected, R27) — an alert left open for such a host is resolved.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import zlib

from django.db import close_old_connections, connection, transaction

from hadash import alerts, config
from hadash.choices import AlertState, Severity, Subject
from hadash.models import Alert
from hosts.choices import HostStatus
from hosts.hastatus import BMC_CHECK_ALERT
from hosts.models import Host

log = logging.getLogger("hadash.oobcheck")

NOT_CHECKED = (HostStatus.DOWN, HostStatus.REMOVED)
# The host list (and their BMC settings) is read again this often.
RELOAD = dt.timedelta(seconds=10)
# The words of a check that found the BMC reporting power Off (hosts.transport).
OFF_WORDS = "reports power Off"


def has_bmc(host) -> bool:
    return bool(host.oobm_enabled and (host.oobm_address or "").strip()
                and (host.oobm_system_id or "").strip())


def offset(name: str, interval: float) -> float:
    """A host's stable place within the interval (spreads the checks)."""
    return zlib.crc32(name.encode()) % max(int(interval), 1)


class BmcChecker:
    """The sweeper's BMC check round; ``executor`` None runs the checks inline."""

    def __init__(self, executor=None):
        self.executor = executor
        self.due_at: dict[int, dt.datetime] = {}
        self.in_flight: set[int] = set()
        self.off_seen: dict[int, dt.datetime] = {}  # host id → first "power Off"
        self.hosts: list = []
        self.loaded_at: dt.datetime | None = None
        self.lock = threading.Lock()

    def _hosts(self, now) -> list:
        """The hosts to check, read at most every RELOAD (the sweep runs every second;
        at 1,000 hosts one query a second for nothing is not free)."""
        if self.loaded_at is None or not (self.loaded_at <= now < self.loaded_at + RELOAD):
            self.hosts = [h for h in Host.objects.exclude(status__in=NOT_CHECKED)
                          .order_by("name") if has_bmc(h)]
            self.loaded_at = now
        return self.hosts

    def due_hosts(self, *, now, cfg) -> list:
        interval = cfg["oob.check.interval"]
        hosts = self._hosts(now)
        out = []
        with self.lock:
            for h in hosts:
                due = self.due_at.get(h.pk)
                if due is None or due > now + dt.timedelta(seconds=interval):
                    # First seen (or the interval was shortened): its place in the round.
                    due = now + dt.timedelta(seconds=offset(h.name, interval))
                    self.due_at[h.pk] = due
                if due <= now and h.pk not in self.in_flight:
                    self.in_flight.add(h.pk)
                    self.due_at[h.pk] = now + dt.timedelta(seconds=interval)
                    out.append(h)
        return out

    def _off_confirmed(self, host, now, cfg) -> bool:
        """A BMC reporting power Off is a failed check only for a host that keeps
        pinging on time afterwards (a BMC pointed at the wrong system): a host that
        really lost power falls behind on ping within ping.interval × ping.timeout and
        is liveness's business (R4, R27), not an alert of its own. So the first Off
        looks again once that much time has passed; the alert opens only if the host
        is then still Up and on time and its BMC still reports Off."""
        from hosts.liveness import behind_cutoff

        cfg = cfg or config.snapshot()
        grace = dt.timedelta(seconds=cfg["ping.interval"] * cfg["ping.timeout"] + 1)
        with self.lock:
            first = self.off_seen.get(host.pk)
            if first is None or now - first > 2 * grace + dt.timedelta(
                    seconds=cfg["oob.check.interval"]):
                self.off_seen[host.pk] = now
                self.due_at[host.pk] = now + grace
                return False
            if now - first < grace:
                return False
        fresh = Host.objects.filter(pk=host.pk).values_list("status", "last_ping").first()
        if fresh is None or fresh[0] != HostStatus.UP or fresh[1] is None \
                or fresh[1] < behind_cutoff(now, cfg):
            with self.lock:
                self.off_seen.pop(host.pk, None)
            return False
        return True

    def next_due(self, now) -> dt.datetime | None:
        """When this round may next act — a listed host's check, a host not placed in
        the round yet, or the next reading of the host list — or None (no host has a
        BMC and the list is not read yet). The scenario runner's idle skipping uses it,
        so a run that skips idle seconds checks every BMC when a run second by second
        does."""
        with self.lock:
            times = [self.due_at.get(h.pk, now) for h in self.hosts]
        if self.loaded_at is not None:
            times.append(self.loaded_at + RELOAD)
        return min(times) if times else None

    def run_due(self, engine, *, now, cfg) -> int:
        """Start the checks that are due; returns how many were started."""
        hosts = self.due_hosts(now=now, cfg=cfg)
        for h in hosts:
            if self.executor is None:
                self._check(engine, h, inline=True, cfg=cfg)
            else:
                self.executor.submit(self._check, engine, h, inline=False, cfg=cfg)
        if hosts or self.executor is None:
            resolve_unchecked(now=now)
        return len(hosts)

    def _check(self, engine, host, *, inline: bool, cfg=None) -> None:
        try:
            fresh = Host.objects.filter(pk=host.pk).first()  # its settings as they are now
            if fresh is None or not has_bmc(fresh) or fresh.status in NOT_CHECKED:
                return
            host = fresh
            try:
                problem = engine.oob.check_bmc(host)
            except Exception as exc:  # a broken client never stops the round
                log.exception("BMC check of %s failed", host.name)
                problem = f"BMC check failed: {type(exc).__name__}: {exc}"
            now = engine.now()
            if problem and OFF_WORDS in problem and not self._off_confirmed(host, now, cfg):
                return
            with self.lock:
                self.off_seen.pop(host.pk, None)
            record(host, problem, now=now)
        except Exception:
            log.exception("recording the BMC check of %s failed", host.name)
            if not inline:
                close_old_connections()
        finally:
            with self.lock:
                self.in_flight.discard(host.pk)
            if not inline:
                connection.close()


def record(host, problem: str | None, *, now) -> None:
    """Open (or refresh) the host's bmc-check-failed alert, or resolve it."""
    with transaction.atomic():
        if problem:
            alerts.open_alert(
                BMC_CHECK_ALERT, Subject.HOST, host.name, now=now, host=host,
                cluster=host.cluster or "", severity=Severity.WARNING, title=problem[:255],
                message=f"The BMC check of host {host.name} fails: {problem}. The host "
                        "cannot be relied on to be fenced, so its HA VMs are at risk.")
        elif alerts.is_open(BMC_CHECK_ALERT, Subject.HOST, host.name):
            alerts.resolve_alert(BMC_CHECK_ALERT, Subject.HOST, host.name, now=now,
                                 message=f"The BMC check of host {host.name} passes again")


def resolve_unchecked(*, now) -> int:
    """Open BMC alerts of hosts no longer checked (BMC removed, host Down or gone):
    resolved, with the reason. One query when there are none."""
    open_names = list(Alert.objects.filter(kind=BMC_CHECK_ALERT, subject=Subject.HOST,
                                           state=AlertState.OPEN)
                      .values_list("subject_name", flat=True))
    if not open_names:
        return 0
    hosts = {h.name: h for h in Host.objects.filter(name__in=open_names)}
    n = 0
    for name in open_names:
        h = hosts.get(name)
        if h is not None and has_bmc(h) and h.status not in NOT_CHECKED:
            continue
        why = ("the host is gone" if h is None else
               f"the host is {h.status}" if h.status in NOT_CHECKED else
               "no BMC is configured any more")
        with transaction.atomic():
            alerts.resolve_alert(BMC_CHECK_ALERT, Subject.HOST, name, now=now,
                                 message=f"No longer checked: {why}")
        n += 1
    return n


__all__ = ["BmcChecker", "record", "resolve_unchecked", "has_bmc"]
