"""Agent protocol, server side: what connect, ping and disconnect do (R1, R6–R8).

The HTTP views (and the websocket consumer, and the scenario runner) validate their
input first and then call these functions with clean data; nothing here parses JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.db import transaction

from hadash.clock import not_before
from hosts.choices import RECOVERABLE_STATUSES, HostEvent, HostStatus


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


def connect(data: ConnectData, *, now) -> tuple:
    """R1/R6: create or reuse the host row by name, issue a fresh token, bring the
    host Connecting → Up, and take its power report. Returns (host, raw token)."""
    from hadash import config
    from hosts.models import Host
    from vms.powersync import process_report

    cfg = config.snapshot()
    with transaction.atomic():
        host, created = Host.objects.select_for_update().get_or_create(
            name=data.name, defaults={"status": HostStatus.CREATING}
        )
        host.type = data.type
        host.hypervisor_type = data.hypervisor
        host.cluster = data.cluster
        host.cpus = data.cpus
        host.memory_mb = data.memory_mb
        host.private_ip_address = data.address
        host.agent_url = data.agent_url
        host.token_generation += 1
        token = host.agent_token()
        host.token_hash = Host.hash_token(token)
        host.last_ping = now
        host.next_investigation = None
        host.save()
        if host.status != HostStatus.CONNECTING:
            host.transition(
                HostStatus.CONNECTING, now=now, event=HostEvent.AGENT_CONNECTED,
                message=f"Host {host.name}: agent connected ({host.status} → Connecting)",
            )
        host.transition(
            HostStatus.UP, now=now, event=HostEvent.READY,
            message=f"Host {host.name} is Up",
        )
        process_report(host, data.vms, now=now, cfg=cfg)
    return host, token


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
        process_report(host, vms, now=now, cfg=cfg)


def disconnect(host, reason: str, *, now) -> None:
    """R7: an agent that says goodbye goes Disconnected, without investigation."""
    host.transition(
        HostStatus.DISCONNECTED, now=now, event=HostEvent.SHUTDOWN_REQUESTED,
        expect=(HostStatus.UP, HostStatus.CONNECTING, HostStatus.ALERT),
        reason=reason or "agent disconnect",
        message=f"Host {host.name}: agent disconnected ({reason or 'no reason given'})",
    )
