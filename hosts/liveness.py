"""Host liveness (R2–R5, CloudStack's AgentManagerImpl monitor): find hosts behind on
ping, investigate them, and act on the verdict.

`monitor_step(engine)` is one sweep: it takes the time from the engine's clock, so
tests and the scenario runner drive it with virtual time; production runs it at
least every second.
"""

from __future__ import annotations

import datetime as dt
import logging

from django.db import transaction
from django.db.models import F, Min, Q

from hadash import config, incidents
from hadash.choices import Severity, Subject
from hadash.events import record_event
from hadash.models import Event, HaWork
from vms.powersync import ha_wanted

from .choices import (
    NO_INVESTIGATION_HOST_TYPES,
    NO_INVESTIGATION_RESOURCE_STATES,
    SWEPT_STATUSES,
    UNWATCHED_HOST_TYPES,
    HostEvent,
    HostStatus,
    Verdict,
)
from .investigators import investigate_host
from .models import Host

log = logging.getLogger("hadash.liveness")

# How long one sweep may hold a host under investigation before another may retry.
INVESTIGATION_LEASE = dt.timedelta(seconds=60)


# No investigation episode under way: none was ever scheduled, or the host pinged
# after the last one was (a ping ends an episode; the ping path does not spend a write
# on saying so).
NO_EPISODE = Q(next_investigation__isnull=True) | Q(next_investigation__lt=F("last_ping"))


def episode_under_way(host: Host) -> bool:
    return host.next_investigation is not None and not (
        host.last_ping and host.next_investigation < host.last_ping
    )


def behind_cutoff(now, cfg) -> dt.datetime:
    return now - dt.timedelta(seconds=cfg["ping.interval"] * cfg["ping.timeout"])


def hosts_to_investigate(now, cfg, *, newly_behind=False) -> list[Host]:
    """R2 (Up/Connecting hosts behind on ping) and R5 (Alert hosts due again).
    `newly_behind`: only hosts whose episode has not started yet (no investigation
    scheduled) — what a between-sweeps detection pass looks for."""
    behind = Q(status__in=SWEPT_STATUSES, last_ping__lt=behind_cutoff(now, cfg))
    if newly_behind:
        wanted = behind & NO_EPISODE
    else:
        due = Q(next_investigation__isnull=True) | Q(next_investigation__lte=now)
        wanted = (behind | Q(status=HostStatus.ALERT)) & due
    return list(
        Host.objects.filter(wanted)
        .exclude(type__in=UNWATCHED_HOST_TYPES)
        .order_by("last_ping", "name")
    )


def next_falls_behind(now, cfg) -> dt.datetime | None:
    """The moment the next watched host that is still on time falls behind on ping
    (R2), or None when no host is on time. The sweeper looks again exactly then, so
    detection does not wait for its next one-second tick."""
    cutoff = behind_cutoff(now, cfg)
    oldest = (
        Host.objects.filter(NO_EPISODE, status__in=SWEPT_STATUSES, last_ping__gte=cutoff)
        .exclude(type__in=UNWATCHED_HOST_TYPES)
        .aggregate(oldest=Min("last_ping"))["oldest"]
    )
    return None if oldest is None else oldest + (now - cutoff)


def monitor_step(engine, cfg=None) -> bool:
    """One sweep. Returns True when it acted on at least one host."""
    now = engine.now()
    cfg = cfg or config.snapshot()
    acted = False
    # R18: hosts on time again whose incident is still Open (a ping that needed no
    # status change) — dismissed; one query when there are none.
    incidents.dismiss_returned_hosts(now=now, cutoff=behind_cutoff(now, cfg))
    for host in hosts_to_investigate(now, cfg):
        try:
            acted |= check_host(engine, host, now=now, cfg=cfg)
        except Exception:  # one bad host never stops the sweep
            log.exception("investigating host %s failed", host.name)
    engine.cluster_checks(now=now, cfg=cfg)  # brakes (R14), maintenance (R15)
    return acted


def _claim(host: Host, now) -> bool:
    """Hold the host for one investigation (conditional UPDATE: one sweeper wins)."""
    return bool(
        Host.objects.filter(
            pk=host.pk,
            status=host.status,
            update_count=host.update_count,
            next_investigation=host.next_investigation,
        ).update(next_investigation=now + INVESTIGATION_LEASE)
    )


def check_host(engine, host: Host, *, now, cfg) -> bool:
    """R3–R5 for one host."""
    guard = {"expect": (host.status,)}
    # R3: no investigation for disabled/maintenance hosts and system-VM host types.
    if host.status != HostStatus.ALERT and (
        host.resource_state in NO_INVESTIGATION_RESOURCE_STATES
        or host.type in NO_INVESTIGATION_HOST_TYPES
    ):
        why = (
            f"resource state {host.resource_state}"
            if host.resource_state in NO_INVESTIGATION_RESOURCE_STATES
            else f"host type {host.type}"
        )
        return _guarded_transition(
            host, HostStatus.DISCONNECTED, now=now, event=HostEvent.SHUTDOWN_REQUESTED,
            reason="PingTimeout",
            message=f"Host {host.name}: behind on ping, {why}: disconnected without "
                    "investigation",
            **guard,
        )
    first = not episode_under_way(host) and host.status != HostStatus.ALERT
    if not _claim(host, now):
        return False
    host.refresh_from_db()
    seen_ping = host.last_ping
    done = False
    try:
        result = _investigate_claimed(engine, host, seen_ping, now=now, cfg=cfg, first=first)
        done = True
        return result
    finally:
        # Every outcome sets the host's next investigation itself, guarded by "no
        # ping arrived meanwhile". When a ping did arrive (the episode is over) or
        # the investigation failed, the claim must not stay behind: it would hide
        # the host from the sweep for INVESTIGATION_LEASE should it fall behind again.
        if done:
            drop_claim(host, now, unless_last_ping=seen_ping)
        else:
            drop_claim(host, now)


_ANY = object()


def drop_claim(host: Host, now, *, unless_last_ping=_ANY) -> None:
    """Drop what is left of check_host's claim on the host (taken at ``now``), so the
    next sweep looks at it again; kept when the host's last ping is still
    ``unless_last_ping`` (then the investigation's outcome set it)."""
    leftover = Host.objects.filter(pk=host.pk, next_investigation=now + INVESTIGATION_LEASE)
    if unless_last_ping is not _ANY:
        leftover = leftover.exclude(last_ping=unless_last_ping)
    leftover.update(next_investigation=None)


def _investigate_claimed(engine, host: Host, seen_ping, *, now, cfg, first: bool) -> bool:
    if host.status in SWEPT_STATUSES and seen_ping and seen_ping >= behind_cutoff(now, cfg):
        # R2: it pinged between the sweep that found it behind and this
        # investigation (which waited for an investigator): it is on time again.
        return _release(host, seen_ping, None, now=now)
    if first:
        # Detection: the moment a host is found behind (once per episode; an
        # undeterminable host is re-investigated without repeating this).
        behind = int((now - seen_ping).total_seconds()) if seen_ping else None
        with transaction.atomic():
            detection = record_event(
                Subject.HOST, host, event=HostEvent.PING_TIMEOUT, reason="PingTimeout",
                now=now, severity=Severity.WARNING,
                message=f"Host {host.name}: no ping for {behind} s; investigating",
            )

    # R4: first a direct health check of the agent.
    health = engine.agents.check_health(host)
    if not health and first:
        # R18: the incident — and so its alert and notifications (R19, R20) — opens
        # once the agent does not answer either, dated from the detection and started
        # at the last ping. A host that was only late (every host, after the management
        # server itself was down and pings went unread) answers and pages no one.
        with transaction.atomic():
            incident = incidents.open_host_incident(host, now=now, started_at=seen_ping)
            Event.objects.filter(pk=detection.pk).update(incident=incident)
    if health:
        with transaction.atomic():
            if not Host.objects.filter(pk=host.pk, last_ping=seen_ping).update(
                last_ping=now, next_investigation=None
            ):
                return False
            if host.status != HostStatus.UP:
                host.transition(
                    HostStatus.UP, now=now, event=HostEvent.PING,
                    message=f"Host {host.name}: agent answers its health check "
                            f"({host.status} → Up)",
                )
            # R18: back before anything was done — its incident is Dismissed.
            incidents.host_back(host, now=now, how="its agent answers its health check")
        return True

    verdict, by = investigate_host(engine, host, now=now, cfg=cfg, health=health)
    if verdict == Verdict.DEAD:
        # Stamped when the verdict is in, not when the investigation began. R27: the
        # BMC reporting power Off (the OutOfBand verdict) is proof the host is fenced.
        return host_down(host, now=engine.now(), cfg=cfg, by=by, seen_ping=seen_ping,
                         fenced_by_bmc=by == "OutOfBand")
    retry = now + dt.timedelta(seconds=cfg["investigate.retry.interval"])
    if verdict == Verdict.ALIVE:
        # R5: alive but not talking to us — Alert; its VMs may still run, so untouched.
        if host.status == HostStatus.ALERT:
            return _release(host, seen_ping, retry, now=now)
        return _guarded_transition(
            host, HostStatus.ALERT, now=now, event=HostEvent.AGENT_DISCONNECTED,
            reason=f"{by}: host alive", seen_ping=seen_ping, severity=Severity.WARNING,
            then=lambda: incidents.host_unreachable(
                host, now=now, why=f"alive ({by}) but not talking to hadash"),
            message=f"Host {host.name} is disconnected but alive ({by}); its VMs are left "
                    "running",
            next_investigation=retry,
        )
    # Unknown: investigate again next sweep; after alert.wait, Alert.
    waited = now - (seen_ping or now)
    if host.status != HostStatus.ALERT and waited > dt.timedelta(seconds=cfg["alert.wait"]):
        return _guarded_transition(
            host, HostStatus.ALERT, now=now, event=HostEvent.WAIT_TIMEOUT,
            reason="undeterminable", seen_ping=seen_ping, severity=Severity.WARNING,
            then=lambda: incidents.host_unreachable(
                host, now=now, why=f"undeterminable for {int(waited.total_seconds())} s"),
            message=f"Host {host.name}: state undeterminable for {int(waited.total_seconds())}"
                    " s; Alert",
            next_investigation=retry,
        )
    # `now` (not None) marks the episode as under way: no second PingTimeout event.
    return _release(host, seen_ping, retry if host.status == HostStatus.ALERT else now, now=now)


def _release(host: Host, seen_ping, next_investigation, *, now) -> bool:
    """End this investigation; the host's episode goes on (`next_investigation`)
    unless it pinged meanwhile (then check_host drops the claim: episode over)."""
    Host.objects.filter(
        pk=host.pk, last_ping=seen_ping, next_investigation=now + INVESTIGATION_LEASE
    ).update(next_investigation=next_investigation)
    return False


def _guarded_transition(host: Host, to: str, *, seen_ping=None, then=None,
                        severity=None, **kwargs) -> bool:
    """A transition that also requires that no ping arrived meanwhile; ``then()``
    runs in its transaction when it happened (the incident's part, R18)."""
    with transaction.atomic():
        if seen_ping is not None and not Host.objects.select_for_update().filter(
            pk=host.pk, last_ping=seen_ping
        ).exists():
            return False
        if not host.transition(to, **kwargs):
            return False
        if severity:
            _event_severity(host, kwargs["event"], kwargs["now"], severity)
        if then is not None:
            then()
        return True


def _event_severity(host: Host, event: str, now, severity: str) -> None:
    """Host.transition writes its events as info (alerts are the Alert table's now,
    R19); a failure's event keeps a severity that says so."""
    Event.objects.filter(host=host, event=event, time=now).update(severity=severity)


def host_down(host: Host, *, now, cfg, by: str, seen_ping=None,
              fenced_by_bmc: bool = False) -> bool:
    """R5 Down branch: event HostDown, status Down, every VM on the host scheduled
    for HA (R10), and the host's incident declared (R18: its alert turns critical) —
    all in one transaction. ``fenced_by_bmc`` (R27): its BMC reports power Off, so it
    counts as fenced (fenced_at, a Fenced event) and no ForceOff is ever sent."""
    with transaction.atomic():
        if seen_ping is not None and not Host.objects.select_for_update().filter(
            pk=host.pk, last_ping=seen_ping
        ).exists():
            return False
        if fenced_by_bmc:
            by = "fenced: BMC reports power Off"
            if host.status != HostStatus.DOWN:
                incident = incidents.host_fenced(host, now=now, by="its BMC (power Off)")
                record_event(
                    Subject.HOST, host, event=HostEvent.FENCED, reason="OutOfBand", now=now,
                    severity=Severity.WARNING, incident=incident,
                    message=f"Host {host.name} fenced: BMC reports power Off (no ForceOff "
                            "needed)")
        if not host.transition(
            HostStatus.DOWN, now=now, event=HostEvent.HOST_DOWN, reason=by,
            expect=(HostStatus.UP, HostStatus.CONNECTING, HostStatus.ALERT,
                    HostStatus.DISCONNECTED),
            next_investigation=None,
            message=f"Host {host.name} is Down ({by or 'investigation'})",
        ):
            return False
        _event_severity(host, HostEvent.HOST_DOWN, now, Severity.CRITICAL)
        vms = HaWork.objects.vms_on_host(host)
        items = HaWork.objects.schedule_restart_for_vms_on_host(host, now=now, cfg=cfg,
                                                                ha=ha_wanted, vms=vms)
        # R18: the host's incident is declared (its alert turns critical, R19).
        incidents.host_declared_down(host, now=now, by=by or "investigation", vms=vms,
                                     items=items, ha=lambda vm: ha_wanted(vm, cfg))
        # VMs whose HA start on this host failed go elsewhere now (R12.5's back-off
        # was for a start that might go through there next time).
        HaWork.objects.retry_starts_on(host, now=now)
    return True
