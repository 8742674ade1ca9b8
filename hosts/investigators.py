"""Investigators (R4, R12.2): is a host — or a VM on it — alive?

Each investigator answers Alive, Dead or Unknown; callers ask them in
`ha.investigators.order` until one is not Unknown. All I/O goes through the engine's
agent and out-of-band clients, and none of it runs inside a database transaction.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from .choices import HostStatus, Verdict
from .models import Host
from .transport import Unreachable

log = logging.getLogger("hadash.investigators")

MAX_NEIGHBOURS = 5


def neighbours(host: Host, *, now, cfg) -> list[Host]:
    """Up hosts of the same cluster that are themselves on time with their pings."""
    cutoff = now - dt.timedelta(seconds=cfg["ping.interval"] * cfg["ping.timeout"])
    return list(
        Host.objects.filter(cluster=host.cluster, status=HostStatus.UP, last_ping__gte=cutoff)
        .exclude(pk=host.pk)
        .exclude(agent_url="")
        .order_by("name")[:MAX_NEIGHBOURS]
    )


# --- host investigators --------------------------------------------------------

def check_on_agent(engine, host: Host, *, now, cfg, health: bool | None = None) -> str:
    """The host's own agent: it answers → Alive; unreachable → Unknown."""
    if health is None:
        health = engine.agents.check_health(host)
    return Verdict.ALIVE if health else Verdict.UNKNOWN


# After the first neighbour says dead, how long the others still running may take to
# say alive (R4: any alive wins) before the verdict is Dead.
NEIGHBOUR_GRACE = 0.5


def _ask(engine, n: Host, host: Host) -> bool | None:
    """One neighbour's check-on-host answer: True/False, or None (it cannot tell, or
    could not be asked)."""
    try:
        return engine.agents.check_on_host(n, host)
    except Unreachable:
        return None
    except Exception:  # a broken neighbour must not stop the investigation
        log.exception("neighbour %s failed answering about %s", n.name, host.name)
        return None


def neighbour(engine, host: Host, *, now, cfg) -> str:
    """Ask Up neighbours: any says alive → Alive; one says dead → Dead; else Unknown.

    They are asked all at once: each probes the host itself before answering (a real
    agent waits its peer_timeout for a dead host), so asking one after another cost
    the sum of their waits — 10.8 s on a real fleet — where at once it costs the
    slowest. An Alive answer decides at once; Dead once every neighbour answered, or
    NEIGHBOUR_GRACE after the first Dead (the others, asked at the same moment about
    the same host, answer within it; one that has not is not waited for)."""
    ns = neighbours(host, now=now, cfg=cfg)
    if len(ns) <= 1:
        answers = [_ask(engine, n, host) for n in ns]
        if True in answers:
            return Verdict.ALIVE
        return Verdict.DEAD if False in answers else Verdict.UNKNOWN
    pool = ThreadPoolExecutor(len(ns), thread_name_prefix="neighbour-probe")
    try:
        pending = {pool.submit(_ask, engine, n, host) for n in ns}
        dead_at = None
        while pending:
            wait_for = None if dead_at is None else max(
                0.0, dead_at + NEIGHBOUR_GRACE - time.monotonic())
            done, pending = wait(pending, timeout=wait_for, return_when=FIRST_COMPLETED)
            if not done:
                break  # the grace after a Dead answer is over
            for f in done:
                answer = f.result()
                if answer is True:
                    return Verdict.ALIVE
                if answer is False and dead_at is None:
                    dead_at = time.monotonic()
        return Verdict.DEAD if dead_at is not None else Verdict.UNKNOWN
    finally:
        # Probes still under way finish on their own (bounded by the client's timeout).
        pool.shutdown(wait=False, cancel_futures=True)


def out_of_band(engine, host: Host, *, now, cfg) -> str:
    """The BMC: Off → Dead; On → Unknown (the hypervisor may still be broken);
    unreachable → Unknown."""
    state = engine.oob.power_state(host)
    return Verdict.DEAD if state == "Off" else Verdict.UNKNOWN


HOST_INVESTIGATORS = {
    "CheckOnAgent": check_on_agent,
    "Neighbour": neighbour,
    "OutOfBand": out_of_band,
}


def investigate_host(engine, host: Host, *, now, cfg, health: bool) -> tuple[str, str]:
    """R4: (verdict, which investigator gave it)."""
    for name in cfg["ha.investigators.order"]:
        fn = HOST_INVESTIGATORS[name]
        if name == "CheckOnAgent":
            verdict = fn(engine, host, now=now, cfg=cfg, health=health)
        else:
            verdict = fn(engine, host, now=now, cfg=cfg)
        if verdict != Verdict.UNKNOWN:
            return verdict, name
    return Verdict.UNKNOWN, ""


# --- VM investigators ------------------------------------------------------------

def vm_on_agent(engine, vm, host: Host, *, now, cfg) -> str:
    try:
        ps = engine.agents.get_vm(host, vm.name)
    except Unreachable:
        return Verdict.UNKNOWN
    except Exception:
        log.exception("agent of %s failed answering about %s", host.name, vm.name)
        return Verdict.UNKNOWN
    return Verdict.ALIVE if ps == "PowerOn" else Verdict.DEAD


def vm_neighbour(engine, vm, host: Host, *, now, cfg) -> str:
    # Neighbours can only tell whether the host lives; a dead host runs no VM.
    return Verdict.DEAD if neighbour(engine, host, now=now, cfg=cfg) == Verdict.DEAD \
        else Verdict.UNKNOWN


def vm_out_of_band(engine, vm, host: Host, *, now, cfg) -> str:
    return out_of_band(engine, host, now=now, cfg=cfg)


VM_INVESTIGATORS = {
    "CheckOnAgent": vm_on_agent,
    "Neighbour": vm_neighbour,
    "OutOfBand": vm_out_of_band,
}


def investigate_vm(engine, vm, host: Host | None, *, now, cfg) -> tuple[str, str]:
    """R12.2: is the VM alive on ``host``? A VM whose host R4 found Down is dead."""
    if host is None:
        return Verdict.DEAD, "no host"
    if host.status == HostStatus.DOWN:
        return Verdict.DEAD, "host Down"
    for name in cfg["ha.investigators.order"]:
        verdict = VM_INVESTIGATORS[name](engine, vm, host, now=now, cfg=cfg)
        if verdict != Verdict.UNKNOWN:
            return verdict, name
    return Verdict.UNKNOWN, ""
