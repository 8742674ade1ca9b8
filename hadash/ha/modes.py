"""HA modes (SPEC R26): `ha.mode` for the installation, overridable per cluster
(clusters.models.Cluster.ha_mode).

- ``armed`` (default): HA acts.
- ``observe``: hosts and VMs are detected, investigated, recorded and planned, but no
  fence, stop, start or migrate is sent: each HA item records what it would have
  done ("would fence kvm-03, then restart vm-12 on kvm-04", the real placement without
  a reservation) and ends Done with reason Observed; its incident records it
  (IncidentVm outcome ``observed``).
- ``disarmed``: no new HA work: HA items not yet past Investigating wait
  (WaitCause.DISARMED, so the VMs' HA status says so); items past it — fencing,
  stopping, restarting, or back in Scheduled after a failed start or once HA stopped
  their VM — finish (`not_started`).
  Hosts are still detected and incidents recorded.

A mode that is not armed is an open alert (kind ``ha-mode``, subject the cluster or
the installation) with its event; `reconcile` (every sweep, and at once after a change
through the API or the dashboard) opens, updates and resolves them, so an edit from the
admin's Configuration page or a scenario's `config ha.mode …` takes effect the same
way. Returning to armed re-examines every host and VM (`rearm`).
"""

from __future__ import annotations

import logging

from django.db import transaction

from hadash import alerts, config, incidents
from hadash.choices import (
    OPEN_INCIDENT_STATES,
    AlertState,
    Reason,
    Severity,
    Step,
    Subject,
    VmOutcome,
    WaitCause,
    WorkType,
)
from hadash.config import HA_MODES, ConfigError
from hadash.events import record_event
from hadash.models import Alert, HaWork, IncidentVm

log = logging.getLogger("hadash.modes")

ARMED, OBSERVE, DISARMED = HA_MODES
ALERT_KIND = "ha-mode"
INSTALLATION = "installation"


# --- reading ---------------------------------------------------------------------------

def overrides() -> dict[str, str]:
    """{cluster: mode} of the clusters that override the installation's mode."""
    from clusters.models import Cluster

    return Cluster.objects.mode_overrides()


def mode_for(cluster: str | None, cfg, overrides_: dict[str, str] | None = None) -> str:
    """The mode in force in ``cluster`` (its override, else the installation's)."""
    over = overrides() if overrides_ is None else overrides_
    return over.get(cluster or "") or cfg["ha.mode"]


def scope_words(cluster: str | None, cfg, overrides_: dict[str, str] | None = None) -> str:
    over = overrides() if overrides_ is None else overrides_
    if cluster and over.get(cluster):
        return f"in cluster {cluster}"
    return "for the installation"


def state(cfg=None) -> dict:
    """The installation's mode, every cluster's override and effective mode, and what
    is not armed (API, dashboard, banner)."""
    from hosts.models import Host

    cfg = cfg or config.snapshot()
    over = overrides()
    names = sorted(set(Host.objects.values_list("cluster", flat=True).distinct()) | set(over))
    clusters = {n: {"override": over.get(n, ""), "mode": mode_for(n, cfg, over)}
                for n in names if n}
    return {"mode": cfg["ha.mode"], "clusters": clusters,
            "not_armed": not_armed(cfg, over)}


def not_armed(cfg=None, overrides_: dict[str, str] | None = None) -> list[dict]:
    """What is not armed: [{"scope": "installation"|"cluster", "name", "mode"}]; empty
    when everything is armed (one or two queries: every page's banner reads it)."""
    cfg = cfg or config.snapshot()
    over = overrides() if overrides_ is None else overrides_
    out = []
    if cfg["ha.mode"] != ARMED:
        out.append({"scope": INSTALLATION, "name": INSTALLATION, "mode": cfg["ha.mode"]})
    for name, mode in sorted(over.items()):
        if mode != ARMED:
            out.append({"scope": "cluster", "name": name, "mode": mode})
    return out


# --- changing ---------------------------------------------------------------------------

def known_clusters() -> set[str]:
    from clusters.models import Cluster
    from hosts.models import Host

    return (set(Host.objects.values_list("cluster", flat=True).distinct())
            | set(Cluster.objects.values_list("name", flat=True)))


def set_mode(mode, *, now, by: str = "", cluster: str | None = None) -> dict:
    """Change the installation's mode, or ``cluster``'s override ("" or None: inherit
    the installation's), with its event; its alert and, on a return to armed, the
    re-examination follow at once (`reconcile`). Raises ConfigError (nothing changed)
    on a bad mode or an unknown cluster. Returns `state()`."""
    if mode is None and cluster is not None:
        mode = ""
    if not isinstance(mode, str):
        raise ConfigError(f"mode must be one of {', '.join(HA_MODES)}, not {mode!r}")
    mode = mode.strip()
    if cluster is None:
        if mode not in HA_MODES:
            raise ConfigError(f"ha.mode must be one of {', '.join(HA_MODES)}, not {mode!r}")
        config.set_value("ha.mode", mode, now=now, by=by)
    else:
        if mode not in (*HA_MODES, ""):
            raise ConfigError(f"a cluster's HA mode is one of {', '.join(HA_MODES)}, or "
                              f"empty for the installation's; not {mode!r}")
        if cluster not in known_clusters():
            raise ConfigError(f"unknown cluster {cluster!r}")
        set_cluster_mode(cluster, mode, now=now, by=by)
    reconcile(now=now)
    return state()


def set_cluster_mode(cluster: str, mode: str, *, now, by: str = "") -> bool:
    """Store ``cluster``'s override with its event (ClusterChanged). True when it
    changed. The caller validated ``mode``."""
    from clusters.models import Cluster

    with transaction.atomic():
        row, _ = Cluster.objects.select_for_update().get_or_create(name=cluster)
        old = row.ha_mode
        if old == mode:
            return False
        row.ha_mode = mode
        row.save(update_fields=["ha_mode"])
        who = f" by {by}" if by else ""
        record_event(Subject.CLUSTER, None, name=cluster, event="ClusterChanged",
                     field="ha_mode", old=old or "(installation's)",
                     new=mode or "(installation's)", reason=by, now=now,
                     message=f"Cluster {cluster}: HA mode {old or 'inherited'} → "
                             f"{mode or 'inherited'}{who}")
    return True


def _alert_text(scope: str, name: str, mode: str, cfg, over) -> tuple[str, str]:
    where = "the installation" if scope == INSTALLATION else f"cluster {name}"
    if mode == OBSERVE:
        title = f"HA in observe mode for {where}: nothing is fenced or restarted"
        text = (f"HA is in observe mode for {where}: failures are detected, investigated "
                "and recorded, and each HA item records what it would have done, but no "
                "fence, stop, start or migrate is sent.")
    else:
        title = f"HA disarmed for {where}: no new HA work"
        text = (f"HA is disarmed for {where}: failures are detected and recorded, but no "
                "new HA work is done; recoveries already past investigation finish.")
    if scope == INSTALLATION:
        own = [f"{c}: {m}" for c, m in sorted(over.items()) if m != mode]
        if own:
            text += f" Clusters with a mode of their own: {', '.join(own)}."
    return title, text


def reconcile(*, now, cfg=None) -> bool:
    """Bring the `ha-mode` alerts in line with the modes in force (R26): one open,
    with its HaModeChanged event, per installation/cluster that is not armed;
    resolved when it is armed again — and then every host and VM is re-examined
    (`rearm`). Cheap when nothing changed (two queries). True when anything did."""
    cfg = cfg or config.snapshot()
    over = overrides()
    wanted = {(Subject.CONFIG if e["scope"] == INSTALLATION else Subject.CLUSTER, e["name"]):
              e for e in not_armed(cfg, over)}
    open_ = {(a.subject, a.subject_name): a for a in
             Alert.objects.filter(kind=ALERT_KIND, state=AlertState.OPEN)}
    changed = rearmed = False
    for key, e in wanted.items():
        title, text = _alert_text(e["scope"], e["name"], e["mode"], cfg, over)
        alert = open_.get(key)
        if alert is not None and alert.title == title and alert.message == text:
            continue
        with transaction.atomic():
            old = ARMED if alert is None else (OBSERVE if "observe" in alert.title
                                               else DISARMED)
            if old != e["mode"]:
                record_event(key[0], None, name=e["name"], event="HaModeChanged",
                             field="ha.mode", old=old, new=e["mode"], now=now,
                             severity=Severity.WARNING, message=title)
            alerts.open_alert(
                ALERT_KIND, key[0], e["name"], now=now, title=title, message=text,
                severity=Severity.CRITICAL if e["mode"] == DISARMED else Severity.WARNING,
                cluster="" if e["scope"] == INSTALLATION else e["name"])
        changed = True
    for key, alert in open_.items():
        if key in wanted:
            continue
        where = "the installation" if key[0] == Subject.CONFIG else f"cluster {key[1]}"
        with transaction.atomic():
            record_event(key[0], None, name=key[1], event="HaModeChanged", field="ha.mode",
                         old=OBSERVE if "observe" in alert.title else DISARMED, new=ARMED,
                         now=now, message=f"HA armed again for {where}")
            alerts.resolve_alert(ALERT_KIND, key[0], key[1], now=now,
                                 message=f"HA armed again for {where}; every host and VM "
                                         "re-examined")
        changed = rearmed = True
    if rearmed:
        rearm(now=now, cfg=cfg)
    return changed


# --- re-arming ---------------------------------------------------------------------------

def rearm(*, now, cfg=None) -> dict[str, list[str]]:
    """Returning to armed (R26): re-examine every host and VM where HA is armed and
    schedule what is needed —

    - HA items waiting because HA was disarmed are due now;
    - a Down host with VMs still on it (observe recorded them, or they had no item)
      has them scheduled, its incident declared again with them;
    - a VM Stopped whose latest incident still wants it running (observed, or left
      pending) and that has no HA item under way is scheduled.

    Returns {"due": [...], "hosts": [...], "vms": [...]} (VM and host names)."""
    from hosts.choices import HostStatus
    from hosts.models import Host
    from vms.choices import VmState
    from vms.models import VMInstance
    from vms.powersync import ha_wanted

    cfg = cfg or config.snapshot()
    over = overrides()
    done: dict[str, list[str]] = {"due": [], "hosts": [], "vms": []}

    def armed(cluster) -> bool:
        return mode_for(cluster, cfg, over) == ARMED

    # 1. Items held while disarmed.
    held = (HaWork.objects.unfinished().filter(waiting=WaitCause.DISARMED)
            .select_related("instance__host", "instance__last_host"))
    for item in held:
        if armed(item.instance.cluster):
            HaWork.objects.filter(pk=item.pk, waiting=WaitCause.DISARMED).update(
                time_to_try=now, updated=now)
            done["due"].append(item.instance.name)
    busy = set(HaWork.objects.unfinished().filter(type=WorkType.HA)
               .values_list("instance_id", flat=True))
    # 2. Down hosts with VMs on them and no HA work under way.
    for host in Host.objects.filter(status=HostStatus.DOWN).order_by("name"):
        if not armed(host.cluster):
            continue
        vms = [vm for vm in HaWork.objects.vms_on_host(host)
               if vm.pk not in busy and ha_wanted(vm, cfg)]
        if not vms:
            continue
        with transaction.atomic():
            items = [i for vm in vms if (i := HaWork.objects.schedule_restart(
                vm, investigate=True, reason=Reason.HOST_DOWN, now=now, cfg=cfg))]
            incidents.host_declared_down(host, now=now, by="HA armed again", vms=vms,
                                         items=items, ha=lambda vm: ha_wanted(vm, cfg))
        busy.update(vm.pk for vm in vms)
        done["hosts"].append(host.name)
        done["vms"].extend(vm.name for vm in vms)
    # 3. Stopped VMs their latest incident still wants running.
    latest: dict[int, IncidentVm] = {}
    for row in (IncidentVm.objects.filter(vm__state=VmState.STOPPED, ha=True)
                .select_related("incident").order_by("id")):
        latest[row.vm_id] = row
    for vm_id, row in latest.items():
        if vm_id in busy or row.outcome not in (VmOutcome.OBSERVED, VmOutcome.PENDING):
            continue
        vm = VMInstance.objects.select_related("host", "last_host").get(pk=vm_id)
        if not armed(vm.cluster) or not ha_wanted(vm, cfg):
            continue
        with transaction.atomic():
            item = HaWork.objects.schedule_restart(vm, investigate=False,
                                                   reason=Reason.VM_POWER_OFF, now=now, cfg=cfg)
            if item is None:
                continue
            if row.incident.state in OPEN_INCIDENT_STATES:
                HaWork.objects.filter(pk=item.pk).update(incident=row.incident)
                if row.outcome != VmOutcome.PENDING:
                    row.outcome = VmOutcome.PENDING
                    row.save(update_fields=["outcome"])
            else:
                incidents.open_vm_incident(vm, item, now=now, started_at=row.down_since,
                                           why="left Stopped while HA was not armed")
        done["vms"].append(vm.name)
    if any(done.values()):
        with transaction.atomic():
            record_event(Subject.CONFIG, None, name=INSTALLATION, event="HaRearmed", now=now,
                         message="HA armed again: " + "; ".join(
                             f"{k}: {', '.join(v)}" for k, v in done.items() if v))
    return done


# --- the HA worker's part ---------------------------------------------------------------

def hold(engine, item, vm, host, *, now, cfg) -> bool:
    """Called by the HA handler before it acts on ``item`` (an HA item): True when the
    mode in force took care of it (disarmed: it waits; observe: it recorded what it
    would do and ended), False when HA goes on as armed."""
    over = overrides()
    cluster = vm.cluster or (host.cluster if host is not None else "")
    mode = mode_for(cluster, cfg, over)
    if mode == ARMED:
        return False
    where = scope_words(cluster, cfg, over)
    if mode == DISARMED:
        if not not_started(item):
            return False  # past Investigating: it finishes (R26)
        from .work import wait_quietly

        wait_quietly(item, now=now, after=cfg["investigate.retry.interval"],
                     waiting=WaitCause.DISARMED,
                     message=f"HA is disarmed {where}: no new HA work; VM {vm.name} waits "
                             "until HA is armed again")
        return True
    observe(engine, item, vm, host, now=now, cfg=cfg, where=where)
    return True


def not_started(item) -> bool:
    """Whether an HA item has not got past Investigating yet (R26: such items wait
    while disarmed): Investigating, or Scheduled without ever having been further —
    an item back in Scheduled after a failed start, or after HA stopped its VM, is a
    recovery under way and finishes."""
    if item.step == Step.INVESTIGATING:
        return True
    if item.step != Step.SCHEDULED:
        return False
    if item.tried:
        return False
    from hadash.models import Event

    return not Event.objects.filter(
        subject=Subject.WORK, subject_id=item.pk, field="step",
        old__in=(Step.FENCING, Step.STOPPING, Step.RESTARTING)).exists()


def would_do(engine, item, vm, host, *, now, cfg) -> tuple[list[str], str | None]:
    """What HA would do for ``item`` from its step, asking only read-only questions
    (investigators, the BMC's power state, placement without a reservation):
    ([steps in words], None) — or ([], why nothing is to be done) when the VM is alive
    on an Up host."""
    from hosts.choices import HostStatus, Verdict
    from hosts.investigators import investigate_vm
    from vms.choices import VmState
    from vms.powersync import ha_wanted

    from . import brake, placement_guard

    steps: list[str] = []
    on = host.name if host is not None else "its host"
    if item.step == Step.INVESTIGATING:
        verdict, by = investigate_vm(engine, vm, host, now=now, cfg=cfg)
        if verdict == Verdict.ALIVE:
            if host is not None and host.status == HostStatus.UP:
                return [], f"VM {vm.name} is alive on {host.name} ({by}); nothing to do"
            return ([f"leave VM {vm.name} alone: alive ({by}) but {on} is "
                     f"{host.status if host else 'unknown'}"], None)
        if verdict == Verdict.DEAD and by == "OutOfBand" and host is not None \
                and host.status != HostStatus.DOWN:
            steps.append(f"count {host.name} as fenced (its BMC reports power Off)")
        elif verdict != Verdict.DEAD and host is not None and host.status != HostStatus.DOWN:
            if engine.oob.power_state(host) == "Off":
                steps.append(f"count {host.name} as fenced (its BMC reports power Off)")
            else:
                steps.append(f"fence {host.name}")
    elif item.step == Step.FENCING and host is not None:
        steps.append(f"fence {host.name}")
    if vm.state not in (VmState.STOPPED,) and item.step != Step.RESTARTING:
        steps.append(f"stop {vm.name} on {on}")
    if not ha_wanted(vm, cfg):
        steps.append(f"leave {vm.name} Stopped (not HA-enabled)")
        return steps, None
    if item.step == Step.RESTARTING and item.target_host_id:
        steps.append(f"restart {vm.name} on {item.target_host.name}")
        return steps, None
    cluster = vm.cluster
    if brake.is_braked(cluster, now=now, cfg=cfg):
        steps.append(f"wait to restart {vm.name}: {brake.WAITING} in cluster {cluster}")
        return steps, None
    # The batch (R24): the incident's VMs observed before this one would have been
    # restarted first; their would-be hosts count as taken, as reservations do when
    # armed — so observe predicts the spread armed mode makes.
    extra, moved = observed_placements(vm)
    target = placement_guard.pick(vm, ha=True, cfg=cfg, extra=extra, moved=moved)
    if target is None:
        words = placement_guard.no_room(vm, ha=True, cfg=cfg)
        steps.append(f"wait to restart {vm.name}: no host has room ({words})")
    else:
        item.observed_target = target.name
        steps.append(f"restart {vm.name} on {target.name}")
    return steps, None


def observed_placements(vm) -> tuple[dict, dict]:
    """({host name: (cpus, memory_mb)}, {vm id: host id}) of the VMs that observe mode
    would have restarted, in the open incidents ``vm`` belongs to."""
    from hosts.models import Host

    rows = list(IncidentVm.objects.filter(
        incident__in=IncidentVm.objects.filter(
            vm_id=vm.pk, incident__state__in=OPEN_INCIDENT_STATES).values("incident_id"),
        outcome=VmOutcome.OBSERVED).exclude(target_host_name="").exclude(vm_id=vm.pk)
        .values_list("vm_id", "vm__cpus", "vm__memory_mb", "target_host_name"))
    if not rows:
        return {}, {}
    extra: dict[str, tuple[int, int]] = {}
    for _vm_id, cpus, memory_mb, name in rows:
        c, m = extra.get(name, (0, 0))
        extra[name] = (c + (cpus or 0), m + (memory_mb or 0))
    ids = dict(Host.objects.filter(name__in=extra).values_list("name", "pk"))
    moved = {vm_id: ids[name] for vm_id, _c, _m, name in rows if name in ids}
    return extra, moved


def observe(engine, item, vm, host, *, now, cfg, where: str = "") -> None:
    """R26 observe: record what would be done, end the item Done (reason Observed);
    the VM's row in its incident(s) is ``observed`` with those words."""
    from hosts.choices import HostStatus
    from vms.choices import POWERED_OFF_STATES, VmState

    from .work import _update, finish, mark_vm, stopped_fields

    steps, nothing = would_do(engine, item, vm, host, now=now, cfg=cfg)
    now = engine.now()
    if nothing:
        finish(item, Step.DONE, now=now, message=nothing)
        return
    words = "would " + ", then ".join(steps)
    message = f"Observe mode{' ' + where if where else ''}: {words}; nothing was sent"
    with transaction.atomic():
        # The words stay on the item: the VM's HA status (waiting, observed) shows them.
        _update(item, now, reason=Reason.OBSERVED, last_error=message[:2000], waiting="")
        if host is not None and host.status == HostStatus.UP and vm.state == VmState.RUNNING \
                and vm.power_state in POWERED_OFF_STATES and vm.power_host_id == host.pk:
            # Its own host reports it off: the record says so (nothing is sent), so the
            # next report does not make it a new failure; armed again, rearm restarts it.
            mark_vm(vm, item, VmState.STOPPED, now=now, event="ObservedStopped",
                    message=f"VM {vm.name} is off ({host.name} reports {vm.power_state}); "
                            "observe mode leaves it Stopped", **stopped_fields(vm))
        rows = list(IncidentVm.objects.select_related("incident").filter(
            vm_id=vm.pk, outcome=VmOutcome.PENDING,
            incident__state__in=OPEN_INCIDENT_STATES))
        for row in rows:
            row.outcome = VmOutcome.OBSERVED
            row.detail = words[:500]
            row.target_host_name = getattr(item, "observed_target", "")
            row.save(update_fields=["outcome", "detail", "target_host_name"])
        finish(item, Step.DONE, now=now, message=message)
        for row in rows:
            row.incident.refresh_from_db()
            observed_complete(row.incident, now=now)


def observed_complete(inc, *, now) -> bool:
    """End an incident whose VMs are all settled, some of them only observed: Resolved,
    its alert resolved with what would have been done (incidents.complete words it for
    restarts)."""
    if not inc.is_open:
        return False
    rows = IncidentVm.objects.filter(incident=inc, ha=True)
    if rows.filter(outcome=VmOutcome.PENDING).exists():
        return False
    observed = list(rows.filter(outcome=VmOutcome.OBSERVED).values_list("vm_name", "detail"))
    if not observed or rows.filter(outcome=VmOutcome.FAILED).exists():
        return incidents.complete(inc, now=now)
    if inc.kind == "host" and inc.declared_at is None:
        return False
    from hadash.choices import IncidentState

    inc.state = IncidentState.RESOLVED
    inc.resolved_at = inc.updated = now
    inc.save(update_fields=["state", "resolved_at", "updated"])
    text = "; ".join(f"{name}: would {detail.removeprefix('would ')}"
                     for name, detail in observed)
    alerts.resolve_alert(
        now=now, incident=inc, title=f"{inc.title}: observed, nothing was done",
        message=f"Observe mode: {len(observed)} HA VM(s) — {text}. Nothing was sent.")
    return True


__all__ = ["ARMED", "OBSERVE", "DISARMED", "ALERT_KIND", "mode_for", "not_armed", "state",
           "set_mode", "set_cluster_mode", "reconcile", "rearm", "hold", "observe",
           "would_do"]
