"""hadash's ASGI application with proposed ingestion changes applied at start-up, so
``bench ping --experiment …`` can measure a change before anyone edits the code.
Each experiment is the reference implementation of a proposal in docs/benchmarks.md.

    HADASH_BENCH_EXPERIMENTS=any,dispatch,nolayer   (comma-separated)

* ``any`` — ``hosts.agent.ingest.apply_batch`` with the steady path's four statements
  written as SQL with one array parameter each (``= ANY(%s)``) instead of Django
  ``__in`` lookups: Django's ``In`` lookup prepares every element in Python and
  psycopg's client-side binding then parses a query with one placeholder per element
  (50 hosts × 10 VMs → ~550 placeholders per SELECT and 500 per UPDATE); py-spy shows
  that as the largest share of the web process's CPU at 1,000 pings/s. Same rows, same
  semantics; on SQLite the original runs.
* ``dispatch`` — ``AgentPingConsumer.dispatch`` without Channels'
  ``aclose_old_connections()`` before every message: the consumer itself never touches
  the database while it handles a ping (the batcher's thread owns its connection), yet
  Channels hops into the single thread-sensitive sync thread for every message.
* ``nolayer`` — ``AgentPingConsumer.channel_layer_alias`` set to an alias that is not
  configured, so agent sockets get no channel layer: nothing is ever sent to an agent
  through it (server→agent calls are HTTP), yet every consumer creates a channel and
  waits on it, and the in-memory layer scans *all* channels on every receive call
  (``InMemoryChannelLayer._clean_expired``): opening N sockets costs O(N²) — py-spy
  showed it at 81% of the web process while 10,000 agents connected (with Redis each
  socket would hold a Redis channel and a receive loop instead).
"""

from __future__ import annotations

import os

from hadash.asgi import application  # noqa: F401  (sets Django up)

EXPERIMENTS = {e.strip() for e in os.environ.get("HADASH_BENCH_EXPERIMENTS", "").split(",")
               if e.strip()}
KNOWN = {"any", "dispatch", "nolayer"}


def apply_batch_any(items):
    """hosts.agent.ingest.apply_batch, steady path in array-parameter SQL."""
    from django.db import connection, transaction
    from django.utils import timezone

    from hadash import config
    from hosts.agent import ingest, service
    from hosts.choices import HostStatus
    from hosts.models import Host
    from vms.choices import REPORTED_STATES

    if connection.vendor != "postgresql":
        return ORIGINAL_APPLY_BATCH(items)
    now = timezone.now()
    interval = config.get("ping.interval")
    hashes = [Host.hash_token(tok) for tok, _ in items]
    hosts = {h.token_hash: h for h in Host.objects.extra(
        where=['"host"."token_hash" = ANY(%s)'], params=[sorted(set(hashes))])}
    results: list[object] = [interval] * len(items)
    ids = sorted({h.pk for h in hosts.values()})
    names = sorted({name for _, vms in items for name, _ in vms})
    with connection.cursor() as cur:
        cur.execute(
            "SELECT id, name, host_id, state, power_state, power_host FROM vm_instance "
            "WHERE host_id = ANY(%s) OR name = ANY(%s)", [ids, names])
        cols = ("id", "name", "host_id", "state", "power_state", "power_host_id")
        by_name = {r[1]: dict(zip(cols, r, strict=True)) for r in cur.fetchall()}
    on_host: dict[int, set[str]] = {}
    idset = set(ids)
    for r in by_name.values():
        if r["host_id"] in idset and r["state"] in REPORTED_STATES:
            on_host.setdefault(r["host_id"], set()).add(r["name"])

    steady_hosts: list[int] = []
    confirmed: list[int] = []
    slow: list[tuple[int, Host, list]] = []
    seen: set[int] = set()
    for i, ((_, vms), digest) in enumerate(zip(items, hashes, strict=True)):
        host = hosts.get(digest)
        if host is None:
            results[i] = ingest.TokenRevoked()
            continue
        steady = host.status == HostStatus.UP and host.pk not in seen
        seen.add(host.pk)
        mine = []
        if steady:
            for name, ps in vms:
                vm = by_name.get(name)
                if vm is None:
                    continue
                if not ingest._consistent(vm, host.pk, ps):
                    steady = False
                    break
                mine.append(vm["id"])
        if steady and not on_host.get(host.pk, set()) <= {n for n, _ in vms}:
            steady = False
        if steady:
            steady_hosts.append(host.pk)
            confirmed.extend(mine)
        else:
            slow.append((i, host, vms))
    if steady_hosts:
        with transaction.atomic(), connection.cursor() as cur:
            cur.execute("UPDATE host SET last_ping = %s WHERE id = ANY(%s)",
                        [now, sorted(steady_hosts)])
            if confirmed:
                cur.execute(
                    "UPDATE vm_instance SET power_state_update_time = %s, "
                    "power_state_update_count = power_state_update_count + 1 "
                    "WHERE id = ANY(%s)", [now, sorted(confirmed)])
    for i, host, vms in slow:
        try:
            service.ping(host, vms, now=now)
        except Exception as exc:  # one bad ping never loses the others
            ingest.log.exception("ping from %s failed", host.name)
            results[i] = exc
    ingest.STATS.batches += 1
    ingest.STATS.pings += len(items)
    ingest.STATS.steady += len(steady_hosts)
    return results


async def dispatch_without_db_close(self, message):
    from channels.consumer import get_handler_name

    handler = getattr(self, get_handler_name(message), None)
    if handler is None:
        raise ValueError(f"No handler for message type {message['type']}")
    if message["type"] != "websocket.receive":
        from channels.db import aclose_old_connections

        await aclose_old_connections()
    await handler(message)


if EXPERIMENTS - KNOWN:
    raise RuntimeError(f"unknown experiment(s) {sorted(EXPERIMENTS - KNOWN)}; known: "
                       f"{sorted(KNOWN)}")

from hosts.agent import consumers, ingest  # noqa: E402

ORIGINAL_APPLY_BATCH = ingest.apply_batch
if "any" in EXPERIMENTS:
    ingest.apply_batch = apply_batch_any
if "dispatch" in EXPERIMENTS:
    consumers.AgentPingConsumer.dispatch = dispatch_without_db_close
if "nolayer" in EXPERIMENTS:
    consumers.AgentPingConsumer.channel_layer_alias = "hadash-agents-use-no-channel-layer"
