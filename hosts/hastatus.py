"""HA status of a host (SPEC R17): a code, a one-line reason an operator can act on,
``since`` and ``next_try`` where one is due.

`host_status(...)` is a pure function of the host row and what is known about it
(config snapshot, when its status last changed, its latest incident, whether its BMC
fails its check); `statuses_for(hosts, now=…)` computes the statuses of a page of
hosts in a fixed number of queries, whatever the page's size; `filter_code(qs, code,
now=…)` selects in the database the hosts whose status has a given code (the same
rules as a SQL CASE, for the list pages' HA status filter).

Codes, first match wins:

- ``down`` — status Down (declared failed); the reason names its incident's state.
- ``alert`` — status Alert (host-unreachable: alive or undeterminable, nothing is
  restarted); next_try = its next investigation.
- ``investigating`` — Up/Connecting, behind on ping, an investigation episode under
  way whose verdict is still unknown (re-investigated every sweep); next_try = the
  moment it is put in Alert if nothing answers (last ping + alert.wait).
- ``suspect`` — Up/Connecting and behind on ping (now − last ping > ping.interval ×
  ping.timeout) but not investigated yet: the verdict is due at the next sweep
  (hosts/liveness runs one at least every second and exactly when a host falls
  behind).
- ``disconnected``, ``connecting``, ``removed``, ``error`` — the status itself.
- ``maintenance``, ``prepare-for-maintenance``, ``error-in-maintenance``,
  ``disabled`` — the resource state of a host that is otherwise fine.
- ``up`` — Up and on time; the reason says when its BMC fails its check (R28), or
  has none, since its HA VMs are then at risk.

Domain code: reads hadash.models, never imports the engine (hadash.ha).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from django.db.models import Max

from hadash.choices import AlertState, IncidentState, Subject

from .choices import SWEPT_STATUSES, HostStatus, ResourceState

# R28: the BMC check opens an alert of this kind per host (subject "host", the host's
# name) while the check fails, and resolves it when the check passes again; its title
# says why. The HA status reads open ones (`bmc_failures`).
BMC_CHECK_ALERT = "bmc-check-failed"

UNSET = object()


@dataclass(frozen=True)
class HaStatus:
    """R17: what HA thinks of a VM or host, in a form an operator can act on."""

    code: str
    reason: str
    since: dt.datetime | None = None
    next_try: dt.datetime | None = None
    cause: str = ""  # waiting VMs: the WaitCause code

    def as_dict(self) -> dict:
        out = {
            "code": self.code,
            "reason": self.reason,
            "since": iso(self.since),
            "next_try": iso(self.next_try),
        }
        if self.cause:
            out["cause"] = str(self.cause)
        return out


def iso(when: dt.datetime | None) -> str | None:
    return when.isoformat(timespec="seconds") if when else None


def clock(when: dt.datetime | None) -> str:
    """A time as operators read it on a status line (UTC)."""
    if when is None:
        return "?"
    return when.astimezone(dt.UTC).strftime("%H:%M:%S")


def fenceable(host, bmc_failing: dict[int, str]) -> tuple[bool, str]:
    """(True, "") when the host can be fenced: a BMC configured and not failing its
    check (R12.2, R28); else (False, why in words)."""
    if not (host.oobm_enabled and host.oobm_address):
        return False, f"host {host.name} has no BMC configured, so it cannot be fenced"
    why = bmc_failing.get(host.pk)
    if why is not None:
        return False, f"BMC check of {host.name} fails ({why}), so it cannot be fenced"
    return True, ""


RESOURCE_CODES = {
    ResourceState.MAINTENANCE: ("maintenance", "in maintenance: no VM runs here and none "
                                               "is placed here"),
    ResourceState.PREPARE_FOR_MAINTENANCE: ("prepare-for-maintenance",
                                            "preparing for maintenance: its VMs are being "
                                            "migrated away"),
    ResourceState.ERROR_IN_MAINTENANCE: ("error-in-maintenance",
                                         "a migration for maintenance failed; it is "
                                         "retried"),
    ResourceState.DISABLED: ("disabled", "disabled by an operator: no VM is placed here"),
}


def host_status(host, *, now, cfg, status_since: dt.datetime | None = None,
                resource_since: dt.datetime | None = None, incident=None,
                bmc_failing: dict[int, str] | None = None) -> HaStatus:
    """R17 for one host. ``status_since``/``resource_since``: when its status /
    resource state last changed (events); ``incident``: its open (or latest) host
    incident; ``bmc_failing``: host id → why its BMC check fails (R28)."""
    bmc_failing = bmc_failing or {}
    status = host.status
    if status == HostStatus.DOWN:
        return HaStatus("down", _down_reason(host, incident),
                        since=(incident.declared_at if incident and incident.declared_at
                               else status_since))
    if status == HostStatus.ALERT:
        nxt = host.next_investigation
        return HaStatus(
            "alert",
            f"host-unreachable: {host.name} does not talk to hadash but may be alive "
            f"(last ping {_age(host.last_ping, now)}); its VMs are left alone until "
            f"its fate is known — next investigation at {clock(nxt)}",
            since=status_since, next_try=nxt)
    if status in SWEPT_STATUSES and host.last_ping is not None:
        limit = cfg["ping.interval"] * cfg["ping.timeout"]
        behind_at = host.last_ping + dt.timedelta(seconds=limit)
        if now > behind_at:
            behind = int((now - host.last_ping).total_seconds())
            if _episode_under_way(host):
                verdict_at = host.last_ping + dt.timedelta(seconds=cfg["alert.wait"])
                return HaStatus(
                    "investigating",
                    f"no ping for {behind} s (limit {limit:g} s); investigators cannot "
                    f"tell yet whether it is alive — checked again every sweep, Alert at "
                    f"{clock(verdict_at)} if nothing answers",
                    since=behind_at, next_try=verdict_at)
            due = now + dt.timedelta(seconds=1)
            return HaStatus(
                "suspect",
                f"behind on ping for {behind} s (limit {limit:g} s); verdict due at "
                f"{clock(due)}",
                since=behind_at, next_try=due)
    if status != HostStatus.UP:
        code = {HostStatus.CREATING: "connecting"}.get(status, str(status).lower())
        words = {
            HostStatus.CONNECTING: "its agent is connecting",
            HostStatus.CREATING: "its agent has not connected yet",
            HostStatus.DISCONNECTED: "its agent is disconnected (behind on ping while "
                                     "disabled or in maintenance: not investigated)",
        }.get(status, f"status {status}")
        return HaStatus(code, words, since=status_since)
    if host.resource_state in RESOURCE_CODES:
        code, words = RESOURCE_CODES[host.resource_state]
        return HaStatus(code, words, since=resource_since)
    ok, why = fenceable(host, bmc_failing)
    reason = "Up, on time"
    if host.last_ping is not None:
        age = (now - host.last_ping).total_seconds()
        if age > cfg["ping.interval"]:
            limit = cfg["ping.interval"] * cfg["ping.timeout"]
            behind_at = host.last_ping + dt.timedelta(seconds=limit)
            reason = (f"Up; a ping is late (last {int(age)} s ago): behind on ping at "
                      f"{clock(behind_at)}")
    if not ok:
        reason += f"; {why}: its HA VMs are at risk"
    return HaStatus("up", reason, since=status_since)


def _episode_under_way(host) -> bool:
    # Same rule as hosts.liveness.episode_under_way (imported lazily there: liveness
    # pulls in the investigators; this module stays a pure function of the row).
    return host.next_investigation is not None and not (
        host.last_ping and host.next_investigation < host.last_ping)


def _age(when: dt.datetime | None, now) -> str:
    if when is None:
        return "never"
    return f"{int((now - when).total_seconds())} s ago"


def _down_reason(host, incident) -> str:
    if incident is None:
        return f"{host.name} is Down"
    parts = [f"{host.name} is Down — incident #{incident.pk} {incident.state}"]
    if incident.vms_affected:
        parts.append(f"{incident.vms_restarted} of {incident.vms_affected} HA VMs restarted")
        if incident.vms_failed:
            parts.append(f"{incident.vms_failed} failed")
    if incident.state == IncidentState.FAILED:
        parts.append("HA gave up on some: see the incident")
    elif incident.state in (IncidentState.RESOLVED, IncidentState.DISMISSED):
        parts.append("repair the host: it rejoins when its agent connects")
    else:
        parts.append("recovery under way")
    return ", ".join(parts)


# --- bulk -----------------------------------------------------------------------------

def bmc_failures(host_names: Iterable[str] | None = None) -> dict[str, str]:
    """R28: host name → why its BMC check fails (open alerts), one query."""
    from hadash.models import Alert

    qs = Alert.objects.filter(kind=BMC_CHECK_ALERT, subject=Subject.HOST,
                              state=AlertState.OPEN)
    if host_names is not None:
        qs = qs.filter(subject_name__in=list(host_names))
    return dict(qs.values_list("subject_name", "title"))


def bmc_failing_by_id(hosts) -> dict[int, str]:
    by_name = bmc_failures({h.name for h in hosts})
    return {h.pk: by_name[h.name] for h in hosts if h.name in by_name}


def last_changes(host_ids: Iterable[int]) -> dict[tuple[int, str], dt.datetime]:
    """(host id, "status" | "resource_state") → time of the last such change (its
    event), one query."""
    from hadash.models import Event

    ids = list(host_ids)
    if not ids:
        return {}
    rows = (Event.objects.filter(subject=Subject.HOST, subject_id__in=ids,
                                 field__in=("status", "resource_state"))
            .values("subject_id", "field").annotate(t=Max("time")).order_by())
    return {(r["subject_id"], r["field"]): r["t"] for r in rows}


def latest_incidents(host_ids: Iterable[int]) -> dict[int, object]:
    """Host id → its newest host incident (open or not), one query."""
    from hadash.choices import IncidentKind
    from hadash.models import Incident

    ids = list(host_ids)
    if not ids:
        return {}
    newest = (Incident.objects.filter(kind=IncidentKind.HOST, host_id__in=ids)
              .values("host_id").annotate(m=Max("id")).values("m"))
    return {i.host_id: i for i in Incident.objects.filter(id__in=newest)}


def statuses_for(hosts, *, now, cfg=None, bmc_failing=UNSET) -> dict[int, HaStatus]:
    """R17 for a page of hosts: host id → HaStatus, in a fixed number of queries
    (configuration, status changes, incidents, BMC checks)."""
    from hadash import config

    hosts = list(hosts)
    if not hosts:
        return {}
    cfg = cfg or config.snapshot()
    ids = [h.pk for h in hosts]
    changes = last_changes(ids)
    down = [h.pk for h in hosts if h.status == HostStatus.DOWN]
    incidents = latest_incidents(down)
    if bmc_failing is UNSET:
        bmc_failing = bmc_failing_by_id(hosts)
    return {
        h.pk: host_status(
            h, now=now, cfg=cfg, status_since=changes.get((h.pk, "status")),
            resource_since=changes.get((h.pk, "resource_state")),
            incident=incidents.get(h.pk), bmc_failing=bmc_failing)
        for h in hosts
    }


def status_of(host, *, now, cfg=None) -> HaStatus:
    return statuses_for([host], now=now, cfg=cfg)[host.pk]


# --- database filter (the list pages' HA status filter) --------------------------------

# Every code host_status can give, in the order an operator reads them.
CODES = ("down", "alert", "investigating", "suspect", "connecting", "disconnected",
         "removed", "error", "rebalancing", "error-in-maintenance",
         "prepare-for-maintenance", "maintenance", "disabled", "up")


def code_expression(*, now, cfg):
    """R17 code of a host as a database expression: the rules of `host_status` in the
    same order (first match wins), for a queryset of hosts."""
    from django.db.models import Case, CharField, F, Q, Value, When
    from django.db.models.functions import Lower

    limit = dt.timedelta(seconds=cfg["ping.interval"] * cfg["ping.timeout"])
    behind = Q(status__in=SWEPT_STATUSES, last_ping__isnull=False, last_ping__lt=now - limit)
    # _episode_under_way with a last ping: next investigation set, not before it.
    episode = Q(next_investigation__isnull=False, next_investigation__gte=F("last_ping"))
    whens = [
        When(status=HostStatus.DOWN, then=Value("down")),
        When(status=HostStatus.ALERT, then=Value("alert")),
        When(behind & episode, then=Value("investigating")),
        When(behind, then=Value("suspect")),
        When(status=HostStatus.CREATING, then=Value("connecting")),
        When(~Q(status=HostStatus.UP), then=Lower("status")),
    ]
    whens += [When(resource_state=rs, then=Value(code))
              for rs, (code, _) in RESOURCE_CODES.items()]
    return Case(*whens, default=Value("up"), output_field=CharField())


def filter_code(qs, code: str, *, now, cfg=None):
    """The hosts of ``qs`` whose R17 code (`host_status`) is ``code``, selected in the
    database (a queryset: no status is computed in Python). An unknown code selects
    nothing."""
    from hadash import config

    if code not in CODES:
        return qs.none()
    cfg = cfg or config.snapshot()
    return qs.annotate(ha_code=code_expression(now=now, cfg=cfg)).filter(ha_code=code)
