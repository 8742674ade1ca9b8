"""HA status of a VM (SPEC R17): a code, a one-line reason an operator can act on,
``since`` and ``next_try`` where one is due.

`vm_status(...)` is a pure function of the VM row and what is known about it: its
latest HA item, its host and when that host's status last changed, the config
snapshot, the failover plan's set of VMs that would not fit if their host failed
(``unfit``: None while no plan is known) and which hosts' BMCs fail their check.
`statuses_for(vms, now=…)` computes the statuses of a page of VMs in a fixed number
of queries, whatever the page's size. `filter_code(qs, code, cfg=…)` selects in the
database the VMs whose status has a given code (the same rules as a SQL CASE, for the
list pages' HA status filter: no status computed per row).

Codes, first match wins:

- ``recovering`` — an unfinished HA item that does not wait: its step.
- ``waiting`` (with ``cause``, a hadash.choices.WaitCause code) — the item waits
  (no-capacity, braked, backoff, fencing-failed, host-unreachable, order,
  anti-affinity, disarmed, observed: the engine records the cause and its words on
  the item); also ``host-unreachable`` for an HA VM whose host is in Alert before any
  item exists (alive or unknown: nothing is restarted).
- ``failed`` — HA gave up (its latest HA item ended in Error) and the VM is not back;
  or the VM is in state Error.
- ``stopped`` — Stopped (or Stopping, Destroyed) not by a failure HA still handles.
- ``unprotected`` — not HA-enabled (ha_enabled, force.ha, vm.ha.enabled).
- ``at-risk`` — Running and HA-enabled, but it would not fit if its host failed
  (failover plan, R22) or its host cannot be fenced (no BMC, or its BMC check
  fails, R28): the reason says which.
- ``protected`` — Running, HA-enabled, fits, host fenceable.

Domain code: reads hadash.models, never imports the engine (hadash.ha).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from django.db.models import Max

from hadash.choices import FINAL_STEPS, Reason, Step, Subject, WaitCause, WorkType
from hosts.choices import SWEPT_STATUSES, HostStatus
from hosts.hastatus import UNSET, HaStatus, bmc_failing_by_id, clock, fenceable

from .choices import VmState
from .powersync import ha_wanted

__all__ = ["HaStatus", "statuses_for", "status_of", "unfit_vm_ids", "vm_status"]

# Words for a waiting cause when the item carries no message of its own.
CAUSE_WORDS = {
    WaitCause.NO_CAPACITY: "no host has room for it",
    WaitCause.BRAKED: "mass-failure brake engaged in its cluster: restarts paused",
    WaitCause.BACKOFF: "its start failed; retried with back-off",
    WaitCause.FENCING_FAILED: "fencing its host failed: not restarted while the host "
                              "might still run it",
    WaitCause.HOST_UNREACHABLE: "its host is in Alert (alive or unknown): nothing is "
                                "restarted until its fate is known",
    WaitCause.ORDER: "waits for higher-priority VMs of its incident",
    WaitCause.ANTI_AFFINITY: "no host honours its anti-affinity group",
    WaitCause.DISARMED: "HA is disarmed: no new HA work",
    WaitCause.OBSERVED: "observe mode: what would be done is recorded, nothing is sent",
}

STEP_WORDS = {
    Step.INVESTIGATING: "investigating whether it still runs",
    Step.FENCING: "fencing its old host",
    Step.STOPPING: "stopping it on its old host",
    Step.SCHEDULED: "choosing a host to restart it on",
    Step.RESTARTING: "starting it",
}


def vm_status(vm, *, now, cfg, item=None, host=None, host_since: dt.datetime | None = None,
              state_since: dt.datetime | None = None, unfit: set[int] | None = None,
              bmc_failing: dict[int, str] | None = None) -> HaStatus:
    """R17 for one VM. ``item``: its latest HA item (finished or not); ``host``: the
    host it is on (default vm.host); ``host_since``: when that host's status last
    changed; ``state_since``: when the VM's state last changed; ``unfit``: ids of HA
    VMs that would not fit if their host failed (None: no plan known yet);
    ``bmc_failing``: host id → why its BMC check fails."""
    bmc_failing = bmc_failing or {}
    if host is None and vm.host_id:
        host = vm.host
    ha = ha_wanted(vm, cfg)
    # 1. An unfinished HA item: recovering, or waiting with its cause.
    if item is not None and item.step not in FINAL_STEPS:
        due = item.time_to_try if item.time_to_try and item.time_to_try > now else None
        if item.waiting:
            return HaStatus("waiting", _waiting_reason(item, cfg), since=item.created,
                            next_try=item.time_to_try, cause=item.waiting)
        where = f" on {item.target_host.name}" if (
            item.step == Step.RESTARTING and item.target_host_id) else ""
        words = STEP_WORDS.get(item.step, item.step)
        return HaStatus("recovering", f"HA work #{item.pk}: {item.step} — {words}{where}",
                        since=item.updated or item.created, next_try=due)
    state = vm.state
    # R26 observe: HA recorded what it would have done and did nothing; until the VM
    # is back (or HA, armed again, restarts it) it waits, observed.
    if item is not None and item.step == Step.DONE and item.reason == Reason.OBSERVED \
            and (state != VmState.RUNNING or host is None or host.status != HostStatus.UP):
        words = item.last_error or CAUSE_WORDS[WaitCause.OBSERVED]
        return HaStatus("waiting", words, since=item.updated, cause=WaitCause.OBSERVED)
    # 2. Its host is in Alert and no item yet: nothing is restarted.
    if ha and host is not None and host.status == HostStatus.ALERT and state in (
            VmState.RUNNING, VmState.STARTING, VmState.STOPPING, VmState.MIGRATING):
        return HaStatus(
            "waiting",
            f"host {host.name} is in Alert (alive or unknown): VM left alone until its "
            f"fate is known — next investigation at {clock(host.next_investigation)}",
            since=host_since, next_try=host.next_investigation,
            cause=WaitCause.HOST_UNREACHABLE)
    # 3. HA gave up, and the VM is not back.
    if state == VmState.ERROR:
        return HaStatus("failed", "VM in state Error", since=state_since)
    if item is not None and item.step == Step.ERROR and state != VmState.RUNNING:
        last = item.last_error.split("; try ")[0] if item.last_error else ""
        tries = f" after {item.tried} tries" if item.tried else ""
        return HaStatus("failed", f"HA gave up{tries} (work #{item.pk})"
                                  + (f"; last error: {last}" if last else ""),
                        since=item.updated)
    # 4. Stopped, not by a failure HA still handles.
    if state in (VmState.STOPPED, VmState.STOPPING, VmState.DESTROYED, VmState.EXPUNGING):
        return HaStatus("stopped", _stopped_reason(vm, item, ha), since=state_since)
    # 5. Not HA-enabled.
    if not ha:
        return HaStatus("unprotected", _unprotected_reason(vm, cfg), since=state_since)
    # 6. Running (or Starting/Migrating) and HA-enabled: would it come back?
    risks = []
    if unfit is not None and vm.pk in unfit:
        on = f"if {host.name} failed" if host is not None else "if its host failed"
        risks.append(f"would not fit {on} (needs {vm.cpus} cpus / {vm.memory_mb} MB)")
    if host is not None:
        ok, why = fenceable(host, bmc_failing)
        if not ok:
            risks.append(why)
    late = _host_behind(host, now=now, cfg=cfg)
    if risks:
        return HaStatus("at-risk", "; ".join(risks) + late, since=state_since)
    plan = ("fits in its cluster's failover plan" if unfit is not None
            else "no failover plan computed yet")
    via = " (by force.ha)" if not vm.ha_enabled else ""
    return HaStatus("protected", f"HA-enabled{via}; {plan}; host fenceable{late}",
                    since=state_since)


def _host_behind(host, *, now, cfg) -> str:
    """"; host kvm-01 behind on ping for 40 s" while its host is behind but not yet
    declared (hosts.hastatus: suspect / investigating), else ""."""
    if host is None or host.status not in SWEPT_STATUSES or host.last_ping is None:
        return ""
    behind = (now - host.last_ping).total_seconds()
    if behind <= cfg["ping.interval"] * cfg["ping.timeout"]:
        return ""
    return (f"; host {host.name} behind on ping for {int(behind)} s: HA acts if it is "
            "declared Down")


def _waiting_reason(item, cfg) -> str:
    cause = item.waiting
    words = item.last_error or CAUSE_WORDS.get(cause, cause)
    if cause == WaitCause.BACKOFF and "of " not in words:
        words = f"{words} (try {item.tried} of {cfg['vm.ha.migration.max.retries']})"
    if item.time_to_try and "next" not in words:
        words = f"{words}; next try at {clock(item.time_to_try)}"
    return words


def _stopped_reason(vm, item, ha: bool) -> str:
    last = vm.last_host if vm.last_host_id else None
    where = f" (last on {last.name})" if last is not None else ""
    if vm.state != VmState.STOPPED:
        return f"{vm.state}{where}"
    if item is not None and item.type == WorkType.HA and item.step == Step.DONE and not ha \
            and item.reason != Reason.OPERATOR:
        return f"Stopped after a failure{where}: not HA-enabled, so not restarted"
    return f"Stopped{where}"


def _unprotected_reason(vm, cfg) -> str:
    if not cfg["vm.ha.enabled"]:
        return "vm.ha.enabled is false: HA is off for every VM"
    return "HA is not enabled for this VM (ha_enabled false, force.ha false)"


# --- bulk -----------------------------------------------------------------------------

def unfit_vm_ids() -> set[int] | None:
    """R22: ids of HA VMs that would not fit if their host failed, from the stored
    failover plans (clusters app); None while no plan is stored."""
    from django.apps import apps

    if not apps.is_installed("clusters"):
        return None
    FailoverPlan = apps.get_model("clusters", "FailoverPlan")  # noqa: N806
    manager = FailoverPlan.objects
    if not hasattr(manager, "unfit_vm_ids") or not manager.exists():
        return None
    return set(manager.unfit_vm_ids())


def latest_items(vm_ids: Iterable[int]) -> dict[int, object]:
    """VM id → its newest HA item (the unfinished one when there is one: at most one
    per VM, and none is scheduled beside it — R10), one query."""
    from hadash.models import HaWork

    ids = list(vm_ids)
    if not ids:
        return {}
    newest = (HaWork.objects.filter(type=WorkType.HA, instance_id__in=ids)
              .values("instance_id").annotate(m=Max("id")).values("m"))
    return {w.instance_id: w
            for w in HaWork.objects.filter(id__in=newest).select_related("target_host")}


def last_changes(subject: str, ids: Iterable[int], field: str) -> dict[int, dt.datetime]:
    """Subject id → time of its last change of ``field`` (its event), one query."""
    from hadash.models import Event

    ids = list(ids)
    if not ids:
        return {}
    rows = (Event.objects.filter(subject=subject, subject_id__in=ids, field=field)
            .values("subject_id").annotate(t=Max("time")).order_by())
    return {r["subject_id"]: r["t"] for r in rows}


def statuses_for(vms, *, now, cfg=None, unfit=UNSET, bmc_failing=UNSET
                 ) -> dict[int, HaStatus]:
    """R17 for a page of VMs: VM id → HaStatus, in a fixed number of queries
    (configuration, latest HA items, VM and host state changes, failover plan, BMC
    checks, and the hosts when ``vms`` did not select them)."""
    from hadash import config
    from hosts.models import Host

    vms = list(vms)
    if not vms:
        return {}
    cfg = cfg or config.snapshot()
    items = latest_items(v.pk for v in vms)
    host_ids = {v.host_id for v in vms if v.host_id}
    loaded = {}
    for v in vms:
        for field in ("host", "last_host"):
            if getattr(v, f"{field}_id") and field in v._state.fields_cache:
                loaded[getattr(v, f"{field}_id")] = getattr(v, field)
    wanted = host_ids | {v.last_host_id for v in vms if v.last_host_id}
    missing = wanted - set(loaded)
    if missing:
        loaded.update({h.pk: h for h in Host.objects.filter(pk__in=missing)})
    for v in vms:  # the reasons name hosts: no query per VM
        if v.last_host_id in loaded and "last_host" not in v._state.fields_cache:
            v.last_host = loaded[v.last_host_id]
    host_since = last_changes(Subject.HOST, host_ids, "status")
    state_since = last_changes(Subject.VM, (v.pk for v in vms), "state")
    if unfit is UNSET:
        unfit = unfit_vm_ids()
    if bmc_failing is UNSET:
        bmc_failing = bmc_failing_by_id([loaded[i] for i in host_ids if i in loaded])
    return {
        v.pk: vm_status(
            v, now=now, cfg=cfg, item=items.get(v.pk), host=loaded.get(v.host_id),
            host_since=host_since.get(v.host_id), state_since=state_since.get(v.pk),
            unfit=unfit, bmc_failing=bmc_failing)
        for v in vms
    }


def status_of(vm, *, now, cfg=None, **kw) -> HaStatus:
    return statuses_for([vm], now=now, cfg=cfg, **kw)[vm.pk]


# --- database filter (the list pages' HA status filter) --------------------------------

# Every code vm_status can give, in the order an operator reads them.
CODES = ("failed", "waiting", "recovering", "at-risk", "unprotected", "stopped",
         "protected")

_OPEN_STEPS = tuple(s for s in Step.values if s not in FINAL_STEPS)
_STOPPED_STATES = (VmState.STOPPED, VmState.STOPPING, VmState.DESTROYED, VmState.EXPUNGING)
_ALERT_WAIT_STATES = (VmState.RUNNING, VmState.STARTING, VmState.STOPPING, VmState.MIGRATING)


def _ha_q(cfg):
    """`ha_wanted` as a Q on VMs (a config snapshot decides which)."""
    from django.db.models import Q

    if not cfg["vm.ha.enabled"]:
        return None  # no VM
    if cfg["force.ha"]:
        return Q(pk__isnull=False)  # every VM
    return Q(ha_enabled=True)


def _not_fenceable_q():
    """Not `hosts.hastatus.fenceable(host)` for the VM's host (which it has): no BMC
    configured, or an open BMC-check alert (R12.2, R28)."""
    from django.db.models import Exists, OuterRef, Q

    from hadash.choices import AlertState
    from hadash.models import Alert
    from hosts.hastatus import BMC_CHECK_ALERT

    failing = Alert.objects.filter(kind=BMC_CHECK_ALERT, subject=Subject.HOST,
                                   state=AlertState.OPEN, subject_name=OuterRef("host__name"))
    return Q(host__isnull=False) & (Q(host__oobm_enabled=False) | Q(host__oobm_address="")
                                    | Exists(failing))


def code_expression(*, cfg, unfit: set[int] | None):
    """R17 code of a VM as a database expression: the rules of `vm_status` in the same
    order (first match wins), on its latest HA item (annotated by `filter_code`)."""
    from django.db.models import Case, CharField, Q, Value, When

    ha = _ha_q(cfg)
    step, waiting, reason = "ha_latest_step", "ha_latest_waiting", "ha_latest_reason"
    whens = [
        # 1. an unfinished item: recovering, or waiting with its cause
        When(Q(**{f"{step}__in": _OPEN_STEPS, waiting: ""}), then=Value("recovering")),
        When(Q(**{f"{step}__in": _OPEN_STEPS}), then=Value("waiting")),
        # R26 observe: done, observed, and the VM not back
        When(Q(**{step: Step.DONE, reason: Reason.OBSERVED})
             & (Q(state__in=[s for s in VmState.values if s != VmState.RUNNING])
                | Q(host__isnull=True)
                | Q(host__status__in=[s for s in HostStatus.values if s != HostStatus.UP])),
             then=Value("waiting")),
    ]
    if ha is not None:  # 2. its host in Alert, no item yet
        whens.append(When(ha & Q(host__status=HostStatus.ALERT, state__in=_ALERT_WAIT_STATES),
                          then=Value("waiting")))
    whens += [
        # 3. HA gave up and the VM is not back
        When(state=VmState.ERROR, then=Value("failed")),
        When(Q(**{step: Step.ERROR})
             & Q(state__in=[s for s in VmState.values if s != VmState.RUNNING]),
             then=Value("failed")),
        # 4. stopped
        When(state__in=_STOPPED_STATES, then=Value("stopped")),
    ]
    # 5. not HA-enabled
    if ha is None:
        whens.append(When(pk__isnull=False, then=Value("unprotected")))
    elif cfg["vm.ha.enabled"] and not cfg["force.ha"]:
        whens.append(When(ha_enabled=False, then=Value("unprotected")))
    # 6. would it come back?
    risk = _not_fenceable_q()
    if unfit:
        risk = Q(pk__in=sorted(unfit)) | risk
    whens.append(When(risk, then=Value("at-risk")))
    return Case(*whens, default=Value("protected"), output_field=CharField())


def filter_code(qs, code: str, *, now=None, cfg=None, unfit=UNSET):
    """The VMs of ``qs`` whose R17 code (`vm_status`) is ``code``, selected in the
    database (a queryset: no status is computed in Python; the failover plan's unfit
    VMs are read once). An unknown code selects nothing. ``now`` is accepted for
    symmetry with `statuses_for`: a VM's code does not depend on the time."""
    from django.db.models import OuterRef, Subquery

    from hadash import config
    from hadash.models import HaWork

    if code not in CODES:
        return qs.none()
    cfg = cfg or config.snapshot()
    if unfit is UNSET:
        unfit = unfit_vm_ids() if code in ("at-risk", "protected") else None
    latest = HaWork.objects.filter(type=WorkType.HA, instance=OuterRef("pk")).order_by("-id")
    qs = qs.annotate(ha_latest_step=Subquery(latest.values("step")[:1]),
                     ha_latest_waiting=Subquery(latest.values("waiting")[:1]),
                     ha_latest_reason=Subquery(latest.values("reason")[:1]))
    return qs.annotate(ha_code=code_expression(cfg=cfg, unfit=unfit)).filter(ha_code=code)
