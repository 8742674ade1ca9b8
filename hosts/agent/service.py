"""Agent protocol, server side: what connect, ping and disconnect do (R1, R6–R8).

The HTTP views (and the websocket consumer, and the scenario runner) validate their
input first and then call these functions with clean data; nothing here parses JSON.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from django.db import IntegrityError, models, transaction

from hadash.choices import Severity, Subject
from hadash.clock import not_before
from hadash.events import record_event
from hosts.choices import RECOVERABLE_STATUSES, HostEvent, HostStatus

log = logging.getLogger("hadash.agent")


class VmReport(list):
    """A power report: (vm name, PowerOn/PowerOff) pairs, as a plain list, plus the
    definitions its entries carried (PROTOCOL.md v1.1) in ``definitions``:
    {name: (format, xml)}. Most reports carry none."""

    def __init__(self, items=(), definitions: dict | None = None):
        super().__init__(items)
        self.definitions: dict[str, tuple[str, str]] = definitions or {}
        self.refused: dict[str, str] = {}  # name → why its definition was dropped


def definitions_of(report) -> dict[str, tuple[str, str]]:
    return getattr(report, "definitions", None) or {}


@dataclass
class AgentIdentity:
    """v1.1 connect's optional ``agent`` block (issue 9)."""

    name: str = ""
    version: str = ""
    hypervisor_uri: str = ""


@dataclass
class ConnectData:
    name: str
    type: str
    hypervisor: str
    cluster: str
    cpus: int
    memory_mb: int
    address: str
    agent_url: str
    vms: list[tuple[str, str]] = field(default_factory=list)  # (vm name, PowerOn/PowerOff)
    agent: AgentIdentity | None = None  # v1.1; None: the agent did not say


@dataclass
class Connected:
    """A connect's answer: the host row and the credentials the agent keeps."""

    host: object  # hosts.models.Host
    token: str
    server_token: str
    ping_interval: int | None = None  # the ping.interval in force, read by the connect


class ConnectRefused(Exception):
    """A connect the protocol refuses; ``status`` is the HTTP status (409: the join
    key named an enrolled host; 401: the token no longer belongs to the host)."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.message = message
        self.status = status


def already_enrolled(name: str) -> str:
    return (f"host {name} is already enrolled; it reconnects with its own token, "
            "or an operator re-enrols it")


def enrol(data: ConnectData, *, now) -> Connected:
    """R29: a connect with the join key. A name not yet enrolled is created with new
    random credentials. An enrolled name is refused (ConnectRefused, 409) and nothing
    is written — unless an operator re-enrolled it less than REENROL_WINDOW ago: then
    this one connect takes the row (new token and server token; the window is used up;
    type and cluster stay the operator's)."""
    from hosts.models import Host

    with transaction.atomic():
        host = Host.objects.select_for_update().filter(name=data.name).first()
        if host is None:
            host = Host(name=data.name, status=HostStatus.CREATING, type=data.type,
                        cluster=data.cluster)
            token, server_token = host.issue_credentials()
            try:
                with transaction.atomic():  # a savepoint: a concurrent enrolment wins
                    _apply(host, data)
                    host.save(force_insert=True)
            except IntegrityError:
                raise ConnectRefused(already_enrolled(data.name)) from None
            interval = _bring_up(host, data, now=now, how="enrolled with the join key")
            return Connected(host, token, server_token, interval)
        if not host.reenrol_open(now):
            raise ConnectRefused(already_enrolled(data.name))
        token, server_token = Host.new_secret(), Host.new_secret()
        # A conditional UPDATE: of two join-key connects racing for one window (SQLite
        # has no row locks), exactly one takes it.
        taken = Host.objects.filter(pk=host.pk, reenrol_until__gt=now).update(
            reenrol_until=None, token_hash=Host.hash_token(token), server_token=server_token,
        )
        if not taken:
            raise ConnectRefused(already_enrolled(data.name))
        host.refresh_from_db()
        record_event(
            Subject.HOST, host, event=HostEvent.REENROLLED, reason="join key",
            severity=Severity.WARNING,
            message=(f"Host {host.name}: re-enrolled — an agent connected with the join key "
                     "in the window an operator opened; it got new credentials and the "
                     "previous agent token no longer works"),
            now=now,
        )
        _apply(host, data)
        host.save()
        interval = _bring_up(host, data, now=now, how="re-enrolled")
        return Connected(host, token, server_token, interval)


def reconnect(host, token: str, data: ConnectData, *, now) -> Connected:
    """R6/R29: a known host connects again with its own token. Its row is reused and
    its token is not rotated (the agent presented it; a lost answer never locks it
    out): the answer echoes it with the stored server token. Type and cluster stay
    as enrolled (an operator's to change). ConnectRefused(401) if the token stopped
    belonging to the host meanwhile (a re-enrolment took it)."""
    from hosts.models import Host

    with transaction.atomic():
        row = Host.objects.select_for_update().filter(pk=host.pk).first()
        if row is None or row.name != data.name or not row.token_matches(token):
            raise ConnectRefused("invalid host token", status=401)
        if not row.server_token:  # enrolled before v1.1 and its migration
            row.server_token = Host.new_secret()
        _apply(row, data)
        row.save()
        interval = _bring_up(row, data, now=now, how="agent connected")
        return Connected(row, token, row.server_token, interval)


def connect(data: ConnectData, *, now) -> tuple:
    """The in-process connect of trusted callers (the scenario runner, tests), which
    have no credentials to present: enrols a new name, reconnects a known one (as
    `reconnect` does: same token, type and cluster kept). Returns (host, token) — the
    token only when one was issued (a new host), else None."""
    from hosts.models import Host

    with transaction.atomic():
        host = Host.objects.select_for_update().filter(name=data.name).first()
        if host is None:
            c = enrol(data, now=now)
            return c.host, c.token
        if not host.server_token:
            host.server_token = Host.new_secret()
        _apply(host, data)
        host.save()
        _bring_up(host, data, now=now, how="agent connected")
    return host, None


def _apply(host, data: ConnectData) -> None:
    """What a connect may change on the row (type and cluster only on creation)."""
    host.hypervisor_type = data.hypervisor
    host.cpus = data.cpus
    host.memory_mb = data.memory_mb
    host.private_ip_address = data.address
    host.agent_url = data.agent_url
    agent = data.agent or AgentIdentity()  # a connect without the block: unknown agent
    host.agent_name = agent.name
    host.agent_version = agent.version
    host.agent_hypervisor_uri = agent.hypervisor_uri


def _bring_up(host, data: ConnectData, *, now, how: str) -> int:
    """R1/R6: the host goes Connecting → Up with its events, and its power report is
    taken. Runs inside the connect's transaction, on a saved row the connect holds
    locked. Returns ``ping.interval`` (read with the rest of the configuration).

    One UPDATE takes the row to Up with the ping stamp, one INSERT writes both events
    (AgentConnected unless it was Connecting already, then Ready), exactly as the two
    transitions did one after the other (issue 12: a fleet connecting at once). The
    report's managed names come from the power report's own read, not a second one."""
    from hadash import config
    from hosts.models import Host
    from vms.powersync import process_report

    cfg = config.snapshot()
    old = host.status
    steps = []  # (event, old, new, message)
    if old != HostStatus.CONNECTING:
        steps.append((HostEvent.AGENT_CONNECTED, old, HostStatus.CONNECTING,
                      f"Host {host.name}: {how} ({old} → Connecting)"))
    steps.append((HostEvent.READY, HostStatus.CONNECTING, HostStatus.UP,
                  f"Host {host.name} is Up"))
    changed = Host.objects.filter(pk=host.pk, status=old).update(
        status=HostStatus.UP, last_ping=now, next_investigation=None,
        update_count=models.F("update_count") + len(steps))
    if not changed:  # moved meanwhile (a connect holds the row locked: not seen)
        host.refresh_from_db()
        _bring_up_stepwise(host, now=now, how=how)
    else:
        _up(host, steps, now=now)
    known = process_report(host, data.vms, now=now, cfg=cfg)
    take_extras(host, data.vms, now=now, known=known)
    return cfg["ping.interval"]


def _bring_up_stepwise(host, *, now, how: str) -> None:
    """The row moved between the connect's read and its UPDATE: transition by
    transition, each conditional on what the row holds."""
    from hosts.models import Host

    Host.objects.filter(pk=host.pk).update(last_ping=now, next_investigation=None)
    host.last_ping, host.next_investigation = now, None
    if host.status != HostStatus.CONNECTING:
        host.transition(
            HostStatus.CONNECTING, now=now, event=HostEvent.AGENT_CONNECTED,
            message=f"Host {host.name}: {how} ({host.status} → Connecting)",
        )
    host.transition(HostStatus.UP, now=now, event=HostEvent.READY,
                    message=f"Host {host.name} is Up")


def _up(host, steps: list[tuple], *, now) -> None:
    from hadash.events import event_values
    from hadash.models import Event

    host.status, host.last_ping, host.next_investigation = HostStatus.UP, now, None
    host.update_count = (host.update_count or 0) + len(steps)
    Event.objects.bulk_create([
        Event(**event_values(Subject.HOST, host, event=event, field="status", old=before,
                             new=after, message=message, now=now))
        for event, before, after, message in steps])


def take_extras(host, report, *, now, known=None, sig=None) -> None:
    """Issue 9, PROTOCOL.md v1.1: the definitions a report carried (stored for the
    VMs this host owns, `vms.definitions`) and its unknown names (`vms.discovery`).
    Runs after the power report was taken. A failure here is logged and costs nothing
    else: the power report stands."""
    from vms import definitions, discovery

    defs = definitions_of(report)
    for name, why in (getattr(report, "refused", None) or {}).items():
        log.warning("host %s: the definition of %s was not stored: %s", host.name, name, why)
    try:
        with transaction.atomic():
            if defs:
                definitions.store_reported(host, defs, now=now)
            discovery.note(host, report, now=now, known=known, definitions=defs, sig=sig)
    except Exception:
        log.exception("host %s: definitions/discovery of a report not stored", host.name)


def ping(host, vms: list[tuple[str, str]], *, now) -> None:
    """R1/R6/R8: refresh last_ping, bring a recovering host back Up, take the report."""
    from hadash import config
    from hosts.models import Host
    from vms.powersync import process_report

    cfg = config.snapshot()
    with transaction.atomic():
        # `now` may be the ping's arrival, earlier than a health check's stamp: never back.
        Host.objects.filter(pk=host.pk).update(last_ping=not_before("last_ping", now))
        host.last_ping = now
        if host.status in RECOVERABLE_STATUSES:
            old = host.status
            if host.transition(
                HostStatus.UP, now=now, event=HostEvent.PING, expect=RECOVERABLE_STATUSES,
                next_investigation=None,
                message=f"Host {host.name}: pinged again ({old} → Up)",
            ):
                host.refresh_from_db()
        known = process_report(host, vms, now=now, cfg=cfg)
        take_extras(host, vms, now=now, known=known)


def disconnect(host, reason: str, *, now) -> None:
    """R7: an agent that says goodbye goes Disconnected, without investigation."""
    host.transition(
        HostStatus.DISCONNECTED, now=now, event=HostEvent.SHUTDOWN_REQUESTED,
        expect=(HostStatus.UP, HostStatus.CONNECTING, HostStatus.ALERT),
        reason=reason or "agent disconnect",
        message=f"Host {host.name}: agent disconnected ({reason or 'no reason given'})",
    )
