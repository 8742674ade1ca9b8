"""Discovery of unmanaged VMs (PROTOCOL.md v1.1, issue 9 part 2).

Names an agent reports that hadash does not know are kept in ``vm_unmanaged``
(`vms.models.UnmanagedVm`): host, name, power state, the definition the agent sent
(if any), first and last seen. Operators list and adopt them (API, dashboard); nothing
is adopted automatically.

Cheap on the ping path: each process remembers, per host, a signature of the last
report it looked at and the unknown names it found. A report identical to the last
one costs one hash and nothing else, until ``REFRESH`` has passed (when unknown names
exist: last_seen is refreshed) or ``RECHECK`` (when none did: a VM removed from
hadash meanwhile shows up). Rows are written only when the set of unknown names (or
their power states) of a host changes, or at those refreshes; a host's rows that its
report no longer lists are deleted at once. Rows not seen for ``EXPIRE`` are hidden
and purged (a host that stopped reporting).

A name that became managed (registered, adopted) is never listed, whatever its row
says (`listed`).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading

from django.db import transaction
from django.db.models import Exists, OuterRef

log = logging.getLogger("hadash.discovery")

REFRESH = dt.timedelta(seconds=60)  # last_seen of a host's unknown VMs, at most this stale
RECHECK = dt.timedelta(minutes=10)  # a host without unknown VMs: looked at again after
EXPIRE = dt.timedelta(minutes=10)  # not seen for this long: hidden, then purged

Report = list[tuple[str, str]]


class _Seen:
    __slots__ = ("signature", "unknown", "at")

    def __init__(self, signature: int, unknown: frozenset, at: dt.datetime):
        self.signature = signature
        self.unknown = unknown
        self.at = at


_seen: dict[int, _Seen] = {}
_lock = threading.Lock()
_last_purge: list[dt.datetime | None] = [None]


def signature(report: Report) -> int:
    return hash(tuple(report))


def forget() -> None:
    """Drop this process's memory (tests)."""
    with _lock:
        _seen.clear()
        _last_purge[0] = None
        _rows_hosts[:] = [None, None]


def needs_look(host_id: int, sig: int, *, now) -> bool:
    """Whether a host's report must be looked at: it changed since the last look, or
    the last look is older than REFRESH (unknown names found) or RECHECK (none)."""
    prev = _seen.get(host_id)
    if prev is None or prev.signature != sig:
        return True
    return now - prev.at >= (REFRESH if prev.unknown else RECHECK)


def note(host, report: Report, *, now, known: set[str] | frozenset[str] | None = None,
         definitions: dict[str, tuple[str, str]] | None = None, sig: int | None = None) -> None:
    """Take a host's power report (and the definitions it carried) for discovery.
    ``known``: the reported names hadash manages, when the caller has them (else
    one query, only when the report needs a look)."""
    host_id = host.pk if hasattr(host, "pk") else host
    sig = signature(report) if sig is None else sig
    if not definitions and not needs_look(host_id, sig, now=now):
        return
    if known is None:
        from .models import VMInstance

        names = [n for n, _ in report]
        known = set(VMInstance.objects.filter(name__in=names).values_list("name", flat=True)) \
            if names else set()
    unknown = {n: ps for n, ps in report if n not in known}
    prev = _seen.get(host_id)
    key = frozenset(unknown.items())
    unknown_defs = {n: d for n, d in (definitions or {}).items() if n in unknown}
    if prev is not None and prev.unknown == key and not unknown_defs and \
            now - prev.at < REFRESH:
        # Same unknown set as written (the report changed in its managed part).
        with _lock:
            _seen[host_id] = _Seen(sig, key, prev.at)
        return
    if not unknown and prev is None and not _may_have_rows(host_id):
        with _lock:
            _seen[host_id] = _Seen(sig, key, now)
        return
    _write(host_id, unknown, unknown_defs, now=now, label=getattr(host, "name", host_id))
    with _lock:
        _seen[host_id] = _Seen(sig, key, now)


def note_batch(entries, *, known) -> None:
    """``note`` for a batch of steady reports ``[(host, report, at)]`` (the websocket
    ingest), whose managed names the caller already read (``known``). Hosts whose
    unknown names all went away cost one DELETE for the whole batch; a host with
    unknown names that changed is written on its own (rare)."""
    from django.db import connection

    from .models import UnmanagedVm

    cleared: list[tuple[int, int, dt.datetime]] = []
    for host, report, at in entries:
        sig = signature(report)
        if not needs_look(host.pk, sig, now=at):
            continue
        if any(n not in known for n, _ in report):
            note(host, report, now=at, known=known, sig=sig)
            continue
        prev = _seen.get(host.pk)
        if (prev is not None and not prev.unknown) or (
                prev is None and not _may_have_rows(host.pk)):
            with _lock:
                _seen[host.pk] = _Seen(sig, frozenset(), at)
            continue
        cleared.append((host.pk, sig, at))
    if not cleared:
        return
    # One statement (no cascade, no signals: a raw DELETE), in autocommit or the
    # caller's transaction.
    UnmanagedVm.objects.filter(host_id__in=sorted(h for h, _, _ in cleared)) \
        ._raw_delete(connection.alias)
    with _lock:
        for host_id, sig, at in cleared:
            _seen[host_id] = _Seen(sig, frozenset(), at)


_rows_hosts: list = [None, None]  # (set of host ids with rows, when read)


def _may_have_rows(host_id: int) -> bool:
    """Whether ``vm_unmanaged`` may hold rows of this host (read once per RECHECK)."""
    from django.utils import timezone

    from .models import UnmanagedVm

    ids, at = _rows_hosts
    now = timezone.now()
    if ids is None or now - at >= RECHECK:
        ids = set(UnmanagedVm.objects.values_list("host_id", flat=True).distinct())
        _rows_hosts[:] = [ids, now]
    return host_id in ids


def _write(host_id: int, unknown: dict[str, str], definitions: dict, *, now,
           label: object = "") -> None:
    from .models import UnmanagedVm

    with transaction.atomic():
        rows = {r.name: r for r in UnmanagedVm.objects.filter(host_id=host_id)
                .only("id", "name", "power_state")}
        gone = [r.pk for name, r in rows.items() if name not in unknown]
        if gone:
            UnmanagedVm.objects.filter(pk__in=gone).delete()
        new = [UnmanagedVm(host_id=host_id, name=name, power_state=ps, first_seen=now,
                           last_seen=now) for name, ps in unknown.items() if name not in rows]
        if new:
            UnmanagedVm.objects.bulk_create(new, ignore_conflicts=True)
        kept = [name for name in unknown if name in rows]
        by_state: dict[str, list[str]] = {}
        for name in kept:
            by_state.setdefault(unknown[name], []).append(name)
        for ps, names in by_state.items():
            UnmanagedVm.objects.filter(host_id=host_id, name__in=names).update(
                power_state=ps, last_seen=now)
        for name, (fmt, xml) in definitions.items():
            UnmanagedVm.objects.filter(host_id=host_id, name=name).update(
                definition_format=fmt, definition_xml=xml)
    if unknown and _rows_hosts[0] is not None:
        _rows_hosts[0].add(host_id)
    if new:
        log.info("host %s reports %d VM(s) hadash does not manage: %s", label, len(new),
                 ", ".join(sorted(r.name for r in new)[:20]))
    _purge(now)


def _purge(now) -> None:
    """Delete rows not seen for EXPIRE (at most once a minute per process)."""
    from .models import UnmanagedVm

    last = _last_purge[0]
    if last is not None and now - last < REFRESH:
        return
    _last_purge[0] = now
    UnmanagedVm.objects.filter(last_seen__lt=now - EXPIRE).delete()


def listed(*, now):
    """The unmanaged VMs operators see: seen within EXPIRE, not managed by now."""
    from .models import UnmanagedVm, VMInstance

    managed = VMInstance.objects.filter(name=OuterRef("name"))
    return (UnmanagedVm.objects.filter(last_seen__gte=now - EXPIRE)
            .exclude(Exists(managed)).select_related("host").defer("definition_xml")
            .order_by("name", "host__name"))
