"""Batched ping ingestion for the websocket transport (MEASUREMENTS.md: one
transaction per ping caps PostgreSQL at ~2,000 pings/s; batched writes at ~20,000).

Pings from all sockets of a web process are collected for a few milliseconds and
applied together. A *steady* ping — Up host, every reported VM already known with
that power state on that host, nothing missing, nothing inconsistent — changes no
state, so a whole batch of them is two UPDATE statements (last_ping of the hosts,
power_state_update_time of their VMs). Any ping that may change state goes through
`service.ping` one by one, so every state change is still committed with its event.

Every ping carries its *arrival time* (taken by the consumer when the message came
in), and that — never the time its batch is applied — is what lands in last_ping and
power_state_update_time (R1, R2): a process that falls behind cannot make a host that
stopped pinging look alive. Neither stamp ever moves backwards (the liveness check may
have set last_ping to the time of a successful health check meanwhile).

While queued, a newer report of a host replaces its older one (both pings are
answered with the result of the newer), so a backlog never holds more than one report
per host. A backlog — the oldest waiting ping older than ``BACKLOG_AFTER`` — raises one
alert event per episode and one event when it clears (docs/benchmarks.md, P5); the
counters of this process are in ``snapshot()`` (``GET /api/v1/engine``, "ingestion").

On PostgreSQL the steady path's statements take one array parameter per column
(``= ANY(%s)``, ``unnest``) instead of Django ``__in`` lookups, which cost more Python
than the database work at 1,000 pings/s (docs/benchmarks.md, P1), each array written as
one literal; a batch reads in one round trip (the interval, the hosts, and per host a
summary of its VMs) and writes in one (the counter and both UPDATEs, one implicit
transaction), so a batch costs two wake-ups of the database, not seven — what bounds a
web process sharing its cores with PostgreSQL and everything else (issue 12). A report
equal to its host's summary is steady without a VM row in Python; any other report of
an Up host is checked VM by VM against rows read for it (a third round trip, only then).
Other databases (SQLite) take the same steps through the ORM, VM by VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import logging
import os
import threading
import weakref
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from asgiref.sync import sync_to_async
from django.db import DatabaseError, connection, models, transaction
from django.utils import timezone

from hadash import config, outage
from hadash.clock import not_before
from hadash.incidents import count
from hosts.choices import HostStatus
from hosts.models import Host
from vms import discovery
from vms.choices import REPORTED_STATES, PowerState, VmState
from vms.models import VMInstance

from . import service

log = logging.getLogger("hadash.ingest")

MAX_BATCH = 500
MAX_WAIT = 0.005  # seconds a ping may wait for company
# A backlog episode starts when the oldest waiting ping is older than BACKLOG_AFTER
# and ends when it is younger than BACKLOG_CLEAR again (or nothing waits): the gap
# keeps a process hovering around the threshold from raising alert after alert.
BACKLOG_AFTER = 1.0  # seconds
BACKLOG_CLEAR = 0.5  # seconds

BACKLOG_EVENT = "IngestionBacklog"
CAUGHT_UP_EVENT = "IngestionCaughtUp"


class TokenRevoked(Exception):
    """The host's token is no longer valid (it reconnected and got a new one)."""


@dataclass
class Stats:
    batches: int = 0
    pings: int = 0  # reports applied
    steady: int = 0  # of which took the steady path
    coalesced: int = 0  # reports replaced by a newer one of the same host while queued


STATS = Stats()

Report = list[tuple[str, str]]


class Digest(str):
    """A host token already hashed (``Host.hash_token``): the websocket consumer hashes
    its token once per connection and queues its pings under the digest."""

    __slots__ = ()


def _digest(token: str) -> str:
    return token if type(token) is Digest else Host.hash_token(token)


class _HostRef:
    """The columns of a host the steady path reads (no model instance per ping); on
    PostgreSQL also its VMs' summary (``_read_pg``): ``sig`` (``_signature`` of what a
    steady report of it says), ``ok`` (each of those VMs consistent), ``vm_ids``."""

    __slots__ = ("pk", "status", "name", "sig", "ok", "vm_ids")

    def __init__(self, pk: int, status: str, name: str, sig: str | None = None,
                 ok: bool = False, vm_ids: list[int] | None = None):
        self.pk, self.status, self.name = pk, status, name
        self.sig, self.ok, self.vm_ids = sig, ok, vm_ids


# A report's signature: its (name, power state) pairs sorted by name (code points, as
# PostgreSQL's COLLATE "C" sorts UTF-8), each joined by US, the pairs by RS — control
# characters no VM name or power state holds (hadash.names; validation refuses them).
_US, _RS = "\x1f", "\x1e"


def _signature(report: Report) -> str:
    """``_HostRef.sig`` of a host this report is steady for (cached on a VmReport:
    the websocket consumer reuses one while a socket's report does not change)."""
    sig = getattr(report, "_ingest_sig", None)
    if sig is None:
        sig = _RS.join([f"{name}{_US}{ps}" for name, ps in sorted(report)])
        if isinstance(report, service.VmReport):
            report._ingest_sig = sig
    return sig


class _Known:
    """The managed names of a batch's reports, for vms.discovery: the VM rows read for
    the reports checked one VM at a time, plus every name of a report whose host
    summary matched (all managed: discovery asks rarely, so built on first use)."""

    __slots__ = ("rows", "reports", "names")

    def __init__(self, rows: dict, reports: list[Report]):
        self.rows, self.reports, self.names = rows, reports, None

    def __contains__(self, name) -> bool:
        if name in self.rows:
            return True
        if self.names is None:
            self.names = {n for report in self.reports for n, _ in report}
        return name in self.names


# Rows of _vm_rows: tuples in this order.
VM_COLUMNS = ("id", "name", "host_id", "state", "power_state", "power_host_id")
_UNSETTLED = (VmState.RUNNING, VmState.STARTING, VmState.STOPPING, VmState.MIGRATING)


def _consistent(vm: tuple, host_id: int, ps: str) -> bool:
    _, _, vm_host, state, power_state, power_host = vm
    if vm_host != host_id or power_host != host_id or power_state != ps:
        return False
    if ps == PowerState.POWER_ON:
        return state == VmState.RUNNING
    return state not in _UNSETTLED


def apply_batch(items: list[tuple], *, now=None, arrays: bool | None = None) -> list[object]:
    """Apply pings ``[(token, report)]`` or ``[(token, report, arrival)]`` (arrival
    defaults to ``now``, itself defaulting to the current time); returns per ping the
    ping interval, an exception, or a TokenRevoked instance. ``arrays``: use the
    PostgreSQL array statements (default: on PostgreSQL); False takes the ORM path
    there too, so tests can compare both.

    R31: one report that cannot be stored never costs the others theirs. When the
    batch's shared statements fail (they read and write every report's rows at once),
    nothing of the batch was written; each report is then applied on its own, and
    only the one(s) that fail again get their error (logged)."""
    try:
        with _savepoint():
            return _apply_batch(items, now=now, arrays=arrays)
    except Exception as exc:
        if len(items) == 1:
            raise
        log.warning("ping batch of %d failed (%r); applying its reports one by one",
                    len(items), exc)
        if connection.needs_rollback or not connection.is_usable():
            raise  # the connection itself is gone: every report would fail alike
    results: list[object] = []
    for item in items:
        try:
            with _savepoint():
                results.extend(_apply_batch([item], now=now, arrays=arrays))
        except Exception as exc:  # noqa: BLE001 - reported to this ping's sender
            log.warning("a ping report could not be stored and was dropped: %r", exc)
            results.append(exc)
    return results


def _savepoint():
    """Inside someone else's transaction (tests), a failed statement would poison it
    (PostgreSQL): give each attempt a savepoint there. In autocommit — the batcher's
    worker thread — a failed statement harms nothing and costs no extra round trip."""
    return transaction.atomic() if connection.in_atomic_block else contextlib.nullcontext()


def _apply_batch(items: list[tuple], *, now=None, arrays: bool | None = None) -> list[object]:
    now = now or timezone.now()
    pg = connection.vendor == "postgresql" if arrays is None else arrays
    hashes = [_digest(it[0]) for it in items]
    if pg:
        interval, hosts = _read_pg(set(hashes))
    else:
        interval = config.get("ping.interval")
        hosts = _hosts_by_hash(set(hashes))
    results: list[object] = [interval] * len(items)
    up = HostStatus.UP

    # PostgreSQL: a report equal to its host's summary (_read_pg) is steady as a whole
    # — every VM it names is one of the host's, consistent with the power state it
    # reports, and no VM the host should report is missing — so its VMs are confirmed
    # without a row each in Python. Any other report of an Up host is checked VM by
    # VM below, against the rows read for those reports only.
    quick: dict[int, list[int]] = {}
    check_names: set[str] = set()
    check_ids: set[int] = set()
    for i, (it, digest) in enumerate(zip(items, hashes, strict=True)):
        host = hosts.get(digest)
        if host is None or host.status != up:
            continue
        if pg and host.ok and host.sig == _signature(it[1]):
            quick[i] = host.vm_ids
        else:
            check_ids.add(host.pk)
            check_names.update(name for name, _ in it[1])
    if not check_ids:
        vm_rows = []
    elif pg:
        vm_rows = _vm_rows_pg(check_ids, check_names)
    else:
        vm_rows = _vm_rows(check_ids, check_names)
    by_name = {r[1]: r for r in vm_rows}
    on_host: dict[int, set[str]] = {}
    for r in by_name.values():
        if r[2] in check_ids and r[3] in REPORTED_STATES:
            on_host.setdefault(r[2], set()).add(r[1])

    steady_hosts: list[tuple[int, object]] = []  # (pk, arrival): as text on PostgreSQL
    confirmed: list[tuple[int, object]] = []
    slow: list[tuple[int, _HostRef, Report, dt.datetime]] = []
    discover: list[tuple[_HostRef, Report, dt.datetime]] = []
    seen: set[int] = set()
    for i, (it, digest) in enumerate(zip(items, hashes, strict=True)):
        vms = it[1]
        at = it[2] if len(it) > 2 and it[2] is not None else now
        host = hosts.get(digest)
        if host is None:
            results[i] = TokenRevoked()
            continue
        pk = host.pk
        # A report carrying definitions (v1.1, rare) is taken by service.ping.
        steady = host.status == up and pk not in seen and not service.definitions_of(vms)
        seen.add(pk)
        mine = quick.get(i) if steady else None
        if steady and mine is None:
            mine = []
            for name, ps in vms:
                vm = by_name.get(name)
                if vm is None:
                    continue  # unknown names are ignored (R8)
                if not _consistent(vm, pk, ps):
                    steady = False
                    break
                mine.append(vm[0])
            if steady:
                expected = on_host.get(pk)
                if expected and len(expected) > len(mine) or (
                        expected and not expected <= {n for n, _ in vms}):
                    steady = False  # a VM is missing from the report: R8 decides
        if steady:
            stamp = at.isoformat() if pg else at
            steady_hosts.append((pk, stamp))
            confirmed.extend([(vm_pk, stamp) for vm_pk in mine])
            discover.append((host, vms, at))
        else:
            slow.append((i, host, vms, at))
    if steady_hosts and pg:
        _write_pg(steady_hosts, confirmed)
    elif steady_hosts:
        with transaction.atomic():
            # R21: pings ingested, counted with the batch that stamps them.
            count("pings_ingested", len(steady_hosts))
            _stamp_orm(Host.objects, "last_ping", steady_hosts)
            _stamp_orm(VMInstance.objects, "power_state_update_time", confirmed,
                       count="power_state_update_count")
    if discover:
        # Issue 9: unknown names → vms.discovery (a hash per report; writes only when
        # a host's unknown names change). Every reported managed name is known.
        known = _Known(by_name, [items[i][1] for i in quick]) if quick else by_name
        try:
            with _savepoint():
                discovery.note_batch(discover, known=known)
        except Exception:
            log.exception("discovery of a batch of %d reports failed", len(discover))
    if slow:
        full = Host.objects.in_bulk([h.pk for _, h, _, _ in slow])
    for i, ref, vms, at in slow:
        host = full.get(ref.pk)
        try:
            if host is None:
                raise Host.DoesNotExist(f"host {ref.name} was deleted")
            with transaction.atomic():
                service.ping(host, vms, now=at)
                count("pings_ingested")
        except Exception as exc:  # one bad ping never loses the others
            if isinstance(exc, outage.DB_ERRORS):  # an outage: one line, not a traceback
                outage.failed("ping ingestion", exc, drop_connection=False)
            else:
                log.exception("ping from %s failed", ref.name)
            results[i] = exc
    STATS.batches += 1
    STATS.pings += len(items)
    STATS.steady += len(steady_hosts)
    return results


def _array(values, quote: bool = False) -> str:
    """A PostgreSQL array literal, one text parameter for the whole list (psycopg's
    client-side binding would escape every element of a list with regular
    expressions: more Python than the database work at thousands of pings/s)."""
    if not quote:
        return "{" + ",".join(values) + "}"
    values = list(values)
    if '"' in "".join(values) or "\\" in "".join(values):  # rare: escape each element
        values = [v.replace("\\", "\\\\").replace('"', '\\"') for v in values]
    return '{"' + '","'.join(values) + '"}' if values else "{}"


def _hosts_by_hash(hashes: set[str]) -> dict[str, _HostRef]:
    rows = Host.objects.filter(token_hash__in=hashes) \
        .values_list("token_hash", "id", "status", "name")
    return {digest: _HostRef(pk, status, name) for digest, pk, status, name in rows}


def _vm_rows(ids: set[int], names: set[str]) -> list[tuple]:
    return list(VMInstance.objects.filter(models.Q(host_id__in=ids) | models.Q(name__in=names))
                .values_list(*VM_COLUMNS))


def _read_pg(hashes: set[str]) -> tuple[object, dict[str, _HostRef]]:
    """What a batch reads, in one round trip (two statements in one query string): the
    ping interval in force (hadash.config.get), and the hosts of these token hashes,
    each with the summary of its VMs a steady report is compared with — over the VMs on
    the host that it must report (R8's states) or that are consistent with it (its
    power host, and a state that agrees with the power state): their ``_signature``,
    whether each is consistent, and their ids."""
    from hadash.models import Configuration

    host_t, vm = Host._meta.db_table, VMInstance._meta
    col = {c: vm.get_field(c).column for c in ("host", "power_host", "power_state", "state")}
    reported = ", ".join(f"'{s}'" for s in REPORTED_STATES)
    unsettled = ", ".join(f"'{s}'" for s in _UNSETTLED)
    consistent = (
        f'(v."{col["power_host"]}" = h."id" AND v."{col["power_state"]}" IS NOT NULL AND '
        f'CASE WHEN v."{col["power_state"]}" = \'{PowerState.POWER_ON}\' '
        f'THEN v."{col["state"]}" = \'{VmState.RUNNING}\' '
        f'ELSE v."{col["state"]}" NOT IN ({unsettled}) END)')
    with connection.cursor() as cur:
        cur.execute(
            f'SELECT "value" FROM "{Configuration._meta.db_table}" WHERE "name" = %s; '
            f'SELECT h."token_hash", h."id", h."status", h."name", '
            f'coalesce(s.sig, \'\'), coalesce(s.ok, true), coalesce(s.ids, \'{{}}\') '
            f'FROM "{host_t}" h LEFT JOIN LATERAL ('
            f'SELECT string_agg(v."name" || chr(31) || v."{col["power_state"]}", chr(30) '
            f'ORDER BY v."name" COLLATE "C") AS sig, bool_and({consistent} IS TRUE) AS ok, '
            f'array_agg(v."id") AS ids FROM "{vm.db_table}" v '
            f'WHERE v."{col["host"]}" = h."id" AND (v."{col["state"]}" IN ({reported}) '
            f'OR {consistent})) s ON true '
            f'WHERE h."token_hash" = ANY(%s::text[])',
            [INTERVAL_KEY, _array(sorted(hashes), quote=True)])
        found = cur.fetchone()
        cur.nextset()
        hosts = {digest: _HostRef(pk, status, name, sig, ok, ids)
                 for digest, pk, status, name, sig, ok, ids in cur.fetchall()}
    return _interval(found[0] if found else None), hosts


def _vm_rows_pg(ids: set[int], names: set[str]) -> list[tuple]:
    """_vm_rows with one array parameter per column."""
    vm = VMInstance._meta
    cols = ", ".join(f'"{vm.get_field(c.removesuffix("_id")).column}"' for c in VM_COLUMNS)
    with connection.cursor() as cur:
        cur.execute(
            f'SELECT {cols} FROM "{vm.db_table}" WHERE "{vm.get_field("host").column}" '
            f'= ANY(%s::bigint[]) OR "name" = ANY(%s::text[])',
            [_array([str(pk) for pk in sorted(ids)]), _array(sorted(names), quote=True)])
        return cur.fetchall()


INTERVAL_KEY = "ping.interval"


def _interval(raw: str | None):
    """hadash.config.get("ping.interval") from the stored value ``raw``."""
    k = config.key(INTERVAL_KEY)
    if raw is not None:
        try:
            return k.parse(raw)
        except config.ConfigError:
            pass  # a value written around the validation: the default, as config.get
    return k.parse(k.default)


def _write_pg(hosts: list[tuple[int, str]], vms: list[tuple[int, str]]) -> None:
    """The steady path's writes in one round trip: each host's last_ping and each
    confirmed VM's power_state_update_time become the ping's arrival (ISO text) unless
    already later (GREATEST ignores a NULL), the VMs' power_state_update_count goes up
    by one, and the R21 counter. Several statements in one query string
    run as one transaction (PostgreSQL's implicit transaction block), or inside the
    caller's."""
    statements, params = [], []
    for table, column, rows, bump in (
            (Host._meta.db_table, "last_ping", hosts, None),
            (VMInstance._meta.db_table, "power_state_update_time", vms,
             "power_state_update_count")):
        if not rows:
            continue
        rows = sorted(rows)  # the same lock order in every process
        extra = f', "{bump}" = "{table}"."{bump}" + 1' if bump else ""
        statements.append(
            f'UPDATE "{table}" SET "{column}" = GREATEST("{table}"."{column}", s.at){extra} '
            f'FROM unnest(%s::bigint[], %s::timestamptz[]) AS s(id, at) '
            f'WHERE "{table}"."id" = s.id')
        params += [_array([str(pk) for pk, _ in rows]), _array([at for _, at in rows])]
    # The counter last, as service.ping's callers count last: a transaction holds its
    # shard's row only at its very end, so two batches in flight (DEPTH) never wait on
    # each other in a cycle through it.
    counter = _counter_sql(len(hosts))
    if counter is not None:
        statements.append(counter[0])
        params += counter[1]
    if connection.in_atomic_block or counter is None:
        with transaction.atomic():
            if counter is None:
                count("pings_ingested", len(hosts))
            with connection.cursor() as cur:
                cur.execute("; ".join(statements), params)
        return
    with connection.cursor() as cur:
        cur.execute("; ".join(statements), params)


def _counter_sql(n: int) -> tuple[str, list] | None:
    """R21's ``pings_ingested`` += n as SQL (metrics.counters.inc's statement), or None
    when the metrics app is not installed."""
    from django.apps import apps

    if not apps.is_installed("metrics"):
        return None
    from metrics import counters

    # The shard of this thread, as metrics.counters.inc takes it.
    return counters._SQL, ["pings_ingested", "", threading.get_native_id() % counters.SHARDS, n]


def _stamp_orm(manager, column: str, rows: list[tuple[int, dt.datetime]], *,
               count: str | None = None) -> None:
    """What _write_pg does to one table, as one UPDATE per distinct time."""
    by_time: dict[dt.datetime, list[int]] = defaultdict(list)
    for pk, at in rows:
        by_time[at].append(pk)
    for at, pks in by_time.items():
        fields = {column: not_before(column, at)}
        if count:
            fields[count] = models.F(count) + 1
        manager.filter(pk__in=sorted(pks)).update(**fields)


def _apply_in_thread(items):
    """The worker thread keeps its connection between batches; a database error
    drops it so the next batch reconnects."""
    try:
        return apply_batch(items)
    except DatabaseError:
        connection.close()
        raise


def _close_connection() -> None:
    connection.close()  # this thread's connection (resolved in the calling thread)


def record_backlog(event: str, message: str, *, now) -> None:
    """The ingestion backlog (``IngestionBacklog``) or its all-clear
    (``IngestionCaughtUp``), as an engine event; R19: one ``IngestionBacklog`` alert
    for the installation while a process is behind, resolved when it catches up."""
    from hadash import alerts
    from hadash.choices import Severity, Subject
    from hadash.events import record_event

    backlog = event == BACKLOG_EVENT
    try:
        with transaction.atomic():
            record_event(
                Subject.ENGINE, None, name=f"ingestion/{os.getpid()}", event=event,
                severity=Severity.WARNING if backlog else Severity.INFO,
                old="caught up" if backlog else "backlog",
                new="backlog" if backlog else "caught up", now=now, message=message,
            )
            if backlog:
                alerts.open_alert(BACKLOG_EVENT, Subject.ENGINE, "ingestion", now=now,
                                  severity=Severity.WARNING,
                                  title="Ping ingestion is behind", message=message)
            else:
                alerts.resolve_alert(BACKLOG_EVENT, Subject.ENGINE, "ingestion", now=now,
                                     message=message)
    except DatabaseError:
        connection.close()
        raise


@dataclass
class _Pending:
    """The newest queued report of one host token, and every ping waiting on it."""

    vms: Report
    arrival: dt.datetime  # of the report kept
    first: dt.datetime  # arrival of the oldest ping waiting here
    futures: list[asyncio.Future] = field(default_factory=list)


# Batches in flight per process, each applied by its own worker thread over its own
# database connection: while one waits for PostgreSQL, the next is gathered and sent
# (issue 12). A host's pings are never in two batches at once, so its reports are
# applied in order.
DEPTH = 2


class Batcher:
    """Collects pings on one event loop and applies them in batches, up to ``depth``
    at a time, each in a worker thread of its own (one database connection each). A
    host whose report is being applied waits for that batch before its next report is
    taken. ``apply`` and ``record`` (async callables) replace the database work in
    tests."""

    def __init__(self, apply=None, record=None, depth: int = DEPTH) -> None:
        # Insertion-ordered, and pings are queued as they arrive: the first entry
        # holds the oldest waiting ping.
        self.pending: dict[str, _Pending] = {}
        self._inflight: dict[int, list[tuple[str, _Pending]]] = {}  # the batches applied
        self._oldest: dict[int, dt.datetime] = {}  # each one's oldest ping
        self._busy: set[str] = set()  # the tokens of the batches in flight
        self.backlog = False  # an episode is under way (its alert is recorded)
        self.backlog_since: dt.datetime | None = None
        self._wakeup = asyncio.Event()
        self._full = asyncio.Event()
        self._done = asyncio.Event()  # a batch finished: a worker is free
        self._backlog_lock = asyncio.Lock()
        self.depth = max(1, depth)
        # One thread per worker, each keeping its own database connection between batches.
        self._executors = [ThreadPoolExecutor(max_workers=1, thread_name_prefix="hadash-ingest")
                           for _ in range(self.depth)]
        self._applies = [apply] * self.depth if apply else [
            sync_to_async(_apply_in_thread, thread_sensitive=False, executor=e)
            for e in self._executors]
        self.apply = self._applies[0]
        self._idle = list(range(self.depth - 1, -1, -1))  # free workers, 0 first
        self._tasks: set[asyncio.Task] = set()
        self.record = record or sync_to_async(record_backlog, thread_sensitive=False,
                                              executor=self._executors[0])
        self.task = asyncio.get_running_loop().create_task(self._run())
        with _lock:
            _all.add(self)

    @property
    def inflight_oldest(self) -> dt.datetime | None:
        try:
            return min(list(self._oldest.values()), default=None)
        except RuntimeError:  # read from another thread while it changed
            return None

    async def submit(self, token: str, vms: Report, arrival: dt.datetime | None = None) -> int:
        """Queue one ping (``arrival``: when it came in, default now) and wait for its
        answer: the ping interval; raises TokenRevoked or the batch's error."""
        arrival = arrival or timezone.now()
        fut = asyncio.get_running_loop().create_future()
        p = self.pending.get(token)
        if p is None:
            self.pending[token] = _Pending(vms, arrival, arrival, [fut])
            self._wakeup.set()
            if len(self.pending) >= MAX_BATCH:
                self._full.set()
        else:
            # Coalesce: the newer report is the one applied; this ping and the older
            # one(s) get its answer.
            if arrival >= p.arrival:
                p.vms, p.arrival = _with_definitions(vms, p.vms), arrival
            else:
                p.vms = _with_definitions(p.vms, vms)
            p.first = min(p.first, arrival)
            p.futures.append(fut)
            STATS.coalesced += 1
        result = await fut
        if isinstance(result, Exception):
            raise result
        return result

    def queued_oldest(self) -> dt.datetime | None:
        try:
            return next(iter(self.pending.values())).first
        except (StopIteration, RuntimeError):  # RuntimeError: read from another thread
            return None

    def oldest_waiting(self) -> dt.datetime | None:
        times = [t for t in (self.inflight_oldest, self.queued_oldest()) if t is not None]
        return min(times) if times else None

    def stats(self, now=None) -> dict:
        now = now or timezone.now()
        oldest = self.oldest_waiting()
        age = max(0.0, (now - oldest).total_seconds()) if oldest else 0.0
        return {
            "queued": len(self.pending),
            "oldest_age_seconds": round(age, 3),
            # an episode under way, or one that starts at the next batch (or would,
            # if the batch being applied ever finished)
            "backlog": self.backlog or age > BACKLOG_AFTER,
        }

    async def _gather(self) -> list[tuple[str, _Pending]]:
        """The next batch: up to MAX_BATCH queued reports of hosts not in flight, the
        oldest first, after waiting up to MAX_WAIT for company."""
        while not self._takeable():
            self._wakeup.clear()
            await self._wakeup.wait()
        if len(self.pending) < MAX_BATCH:
            self._full.clear()
            try:
                await asyncio.wait_for(self._full.wait(), MAX_WAIT)
            except TimeoutError:
                pass
        if self._busy:
            taken = list(itertools.islice(
                (t for t in self.pending if t not in self._busy), MAX_BATCH))
        else:
            taken = list(itertools.islice(self.pending, MAX_BATCH))
        return [(token, self.pending.pop(token)) for token in taken]

    def _takeable(self) -> bool:
        if not self._busy:
            return bool(self.pending)
        return any(t not in self._busy for t in self.pending)

    async def _check_backlog(self, oldest: dt.datetime | None, queued: int) -> None:
        """One alert when the oldest waiting ping passes BACKLOG_AFTER, one event when
        it is below BACKLOG_CLEAR again."""
        now = timezone.now()
        age = (now - oldest).total_seconds() if oldest else 0.0
        if not self.backlog and age > BACKLOG_AFTER:
            message = (f"Ping ingestion is behind in web process pid {os.getpid()}: "
                       f"{queued} ping report(s) waiting, the oldest for {age:.1f} s")
            event = BACKLOG_EVENT
        elif self.backlog and age < BACKLOG_CLEAR:
            took = (now - self.backlog_since).total_seconds() if self.backlog_since else 0
            message = (f"Ping ingestion caught up in web process pid {os.getpid()} after "
                       f"{took:.1f} s ({queued} ping report(s) waiting, the oldest for "
                       f"{age:.1f} s)")
            event = CAUGHT_UP_EVENT
        else:
            return
        try:
            await self.record(event, message, now=now)
        except Exception:
            log.exception("could not record %s", event)
            return  # tried again at the next check
        self.backlog = event == BACKLOG_EVENT
        self.backlog_since = now if self.backlog else None
        (log.warning if self.backlog else log.info)("%s", message)

    async def _run(self) -> None:
        try:
            await self._loop()
        except Exception:
            log.exception("ping batcher stopped")  # batcher() starts a new one
            raise
        finally:
            # Nobody would answer the pings still queued here: fail them (their
            # sockets get an error instead of waiting forever). And the event loop
            # is going away, or this batcher is: so do the workers' connections.
            stopped = RuntimeError("ping batcher stopped")
            for batch in list(self._inflight.values()):
                for _, p in batch:
                    for fut in p.futures:
                        if not fut.done():
                            fut.set_exception(stopped)
            for p in self.pending.values():
                for fut in p.futures:
                    if not fut.done():
                        fut.set_exception(stopped)
            self.pending.clear()
            for task in list(self._tasks):
                task.cancel()
            for executor in self._executors:
                executor.submit(_close_connection)
                executor.shutdown(wait=False)

    async def _loop(self) -> None:
        n = 0
        while True:
            while not self._idle:  # every worker busy: wait for one
                self._done.clear()
                await self._done.wait()
            batch = await self._gather()
            worker = self._idle.pop()
            n += 1
            self._inflight[n] = batch
            self._oldest[n] = min(p.first for _, p in batch)
            self._busy.update(token for token, _ in batch)
            await self._check_backlog_once(self.oldest_waiting(),
                                           sum(map(len, self._inflight.values()))
                                           + len(self.pending))
            task = asyncio.ensure_future(self._apply(n, worker, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _apply(self, n: int, worker: int, batch: list[tuple[str, _Pending]]) -> None:
        try:
            results = await self._applies[worker]([(t, p.vms, p.arrival) for t, p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for {len(batch)} pings")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, outage.DB_ERRORS):  # an outage: one line per process
                outage.failed("ping ingestion", exc, drop_connection=False)
            else:
                log.exception("ping batch failed")
            results = [exc] * len(batch)
        else:
            outage.ok()
        finally:
            self._inflight.pop(n, None)
            self._oldest.pop(n, None)
            self._busy.difference_update(token for token, _ in batch)
            self._idle.append(worker)
            self._done.set()
            self._wakeup.set()  # reports of these hosts may wait
        for (_, p), res in zip(batch, results, strict=True):
            for fut in p.futures:
                if not fut.done():
                    fut.set_result(res)
        if self.backlog and not self.pending and not self._inflight:
            await self._check_backlog_once(None, 0)  # drained: nothing may come for a while

    async def _check_backlog_once(self, oldest: dt.datetime | None, queued: int) -> None:
        async with self._backlog_lock:  # the loop and a finishing batch: one at a time
            await self._check_backlog(oldest, queued)


def _with_definitions(kept: Report, dropped: Report) -> Report:
    """A coalesced report keeps the definitions (PROTOCOL.md v1.1: sent once, when
    they change) of the report it replaces, unless it carries newer ones itself."""
    older = service.definitions_of(dropped)
    if not older:
        return kept
    # A new report: ``kept`` may be a socket's cached one (hosts.agent.consumers), never
    # to be changed.
    merged = service.VmReport(kept, {**older, **service.definitions_of(kept)})
    merged.refused = dict(getattr(kept, "refused", None) or {})
    return merged


_batchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_all: weakref.WeakSet = weakref.WeakSet()  # every live batcher, for snapshot()
_lock = threading.Lock()


def batcher() -> Batcher:
    loop = asyncio.get_running_loop()
    b = _batchers.get(loop)
    if b is None or b.task.done():
        b = _batchers[loop] = Batcher()
    return b


def snapshot(now=None) -> dict:
    """This process's ingestion counters and backlog, for ``GET /api/v1/engine``
    (each web process answers for itself). Safe to call from any thread."""
    now = now or timezone.now()
    with _lock:
        live = [b for b in _all if not b.task.done()]
    parts = [b.stats(now) for b in live]
    return {
        "pid": os.getpid(),
        "pings": STATS.pings,
        "batches": STATS.batches,
        "steady": STATS.steady,
        "coalesced": STATS.coalesced,
        "queued": sum(p["queued"] for p in parts),
        "oldest_age_seconds": max((p["oldest_age_seconds"] for p in parts), default=0.0),
        "backlog": any(p["backlog"] for p in parts),
        "backlog_after_seconds": BACKLOG_AFTER,
    }
