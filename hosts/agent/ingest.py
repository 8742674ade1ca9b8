"""Batched ping ingestion for the websocket transport (MEASUREMENTS.md: one
transaction per ping caps PostgreSQL at ~2,000 pings/s; batched writes at ~20,000).

Pings from all sockets of a web process are collected for a few milliseconds and
applied together. A *steady* ping — Up host, every reported VM already known with
that power state on that host, nothing missing, nothing inconsistent — changes no
state, so a whole batch of them is two UPDATE statements (last_ping of the hosts,
power_state_update_time of their VMs). Any ping that may change state goes through
`service.ping` one by one, so every state change is still committed with its event.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.db import DatabaseError, connection, models, transaction
from django.utils import timezone

from hadash import config
from hosts.choices import HostStatus
from hosts.models import Host
from vms.choices import REPORTED_STATES, PowerState, VmState
from vms.models import VMInstance

from . import service

log = logging.getLogger("hadash.ingest")

MAX_BATCH = 500
MAX_WAIT = 0.005  # seconds a ping may wait for company


class TokenRevoked(Exception):
    """The host's token is no longer valid (it reconnected and got a new one)."""


@dataclass
class Stats:
    batches: int = 0
    pings: int = 0
    steady: int = 0


STATS = Stats()


def _consistent(vm: dict, host_id: int, ps: str) -> bool:
    if vm["host_id"] != host_id or vm["power_host_id"] != host_id or vm["power_state"] != ps:
        return False
    if ps == PowerState.POWER_ON:
        return vm["state"] == VmState.RUNNING
    return vm["state"] not in (VmState.RUNNING, VmState.STARTING, VmState.STOPPING,
                               VmState.MIGRATING)


def apply_batch(items: list[tuple[str, list[tuple[str, str]]]]) -> list[object]:
    """Apply pings [(token, report)]; returns per ping the ping interval, or a
    TokenRevoked instance."""
    now = timezone.now()
    interval = config.get("ping.interval")
    hashes = [Host.hash_token(tok) for tok, _ in items]
    hosts = {h.token_hash: h for h in Host.objects.filter(token_hash__in=set(hashes))}
    results: list[object] = [interval] * len(items)
    ids = {h.pk for h in hosts.values()}
    names = {name for _, vms in items for name, _ in vms}
    rows = VMInstance.objects.filter(models.Q(host_id__in=ids) | models.Q(name__in=names)) \
        .values("id", "name", "host_id", "state", "power_state", "power_host_id")
    by_name = {r["name"]: r for r in rows}
    on_host: dict[int, set[str]] = {}
    for r in by_name.values():
        if r["host_id"] in ids and r["state"] in REPORTED_STATES:
            on_host.setdefault(r["host_id"], set()).add(r["name"])

    steady_hosts: list[int] = []
    confirmed: list[int] = []
    slow: list[tuple[int, Host, list]] = []
    seen: set[int] = set()
    for i, ((_, vms), digest) in enumerate(zip(items, hashes, strict=True)):
        host = hosts.get(digest)
        if host is None:
            results[i] = TokenRevoked()
            continue
        steady = host.status == HostStatus.UP and host.pk not in seen
        seen.add(host.pk)
        mine = []
        if steady:
            for name, ps in vms:
                vm = by_name.get(name)
                if vm is None:
                    continue  # unknown names are ignored (R8)
                if not _consistent(vm, host.pk, ps):
                    steady = False
                    break
                mine.append(vm["id"])
        if steady and not on_host.get(host.pk, set()) <= {n for n, _ in vms}:
            steady = False  # a VM is missing from the report: R8 decides
        if steady:
            steady_hosts.append(host.pk)
            confirmed.extend(mine)
        else:
            slow.append((i, host, vms))
    if steady_hosts:
        with transaction.atomic():
            Host.objects.filter(pk__in=steady_hosts).update(last_ping=now)
            if confirmed:
                VMInstance.objects.filter(pk__in=confirmed).update(
                    power_state_update_time=now,
                    power_state_update_count=models.F("power_state_update_count") + 1,
                )
    for i, host, vms in slow:
        try:
            service.ping(host, vms, now=now)
        except Exception as exc:  # one bad ping never loses the others
            log.exception("ping from %s failed", host.name)
            results[i] = exc
    STATS.batches += 1
    STATS.pings += len(items)
    STATS.steady += len(steady_hosts)
    return results


def _apply_in_thread(items):
    """The worker thread keeps its connection between batches; a database error
    drops it so the next batch reconnects."""
    try:
        return apply_batch(items)
    except DatabaseError:
        connection.close()
        raise


class Batcher:
    """Collects pings on one event loop and applies them in batches, one batch at a
    time, in a worker thread."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())
        self.apply = sync_to_async(_apply_in_thread, thread_sensitive=False)

    async def submit(self, token: str, vms: list[tuple[str, str]]) -> int:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((token, vms, fut))
        result = await fut
        if isinstance(result, TokenRevoked):
            raise result
        if isinstance(result, Exception):
            raise result
        return result

    async def _run(self) -> None:
        while True:
            first = await self.queue.get()
            batch = [first]
            deadline = asyncio.get_running_loop().time() + MAX_WAIT
            while len(batch) < MAX_BATCH:
                timeout = deadline - asyncio.get_running_loop().time()
                if timeout <= 0 and self.queue.empty():
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), max(timeout, 0)))
                except TimeoutError:
                    break
            try:
                results = await self.apply([(t, v) for t, v, _ in batch])
            except Exception as exc:
                log.exception("ping batch failed")
                results = [exc] * len(batch)
            for (_, _, fut), res in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(res)


_batchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def batcher() -> Batcher:
    loop = asyncio.get_running_loop()
    b = _batchers.get(loop)
    if b is None or b.task.done():
        b = _batchers[loop] = Batcher()
    return b
