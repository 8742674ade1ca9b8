"""Admission control (R23): `ha.failover.level` (default 1) and `ha.admission` (`off`,
`warn` default, `enforce`).

- enforce: registering or starting an HA VM — or making a VM HA-enabled — that would
  push its cluster's failover capacity below the level is refused with the reason
  ("cluster c1 would survive 0 host failures with vm-9 (level 1): if kvm-03 failed, 2
  of its 5 HA VMs would not fit"). The operator entry points (hadash.ha.actions, the
  API) ask `refusal`; HA restarts never do: they are never refused.
- warn: allowed; an alert (kind `failover-level`, subject cluster) is open while a
  cluster's capacity is below the level — opened and resolved where the plans are
  recomputed (`sync_alerts`, from clusters.plans.refresh). It tells of a shortage an
  operator must fix (too little room, too many HA VMs): it is not opened while a host
  of the cluster is failed or failing (Down, Alert, Disconnected, Error) — capacity
  lost to a failure is that failure's incident and its one alert (R19) — but one open
  already stays open until the capacity is back.
- off: nothing.

The capacity with the VM is computed with the failover plan's code (vms.failover) on a
copy of the cluster that includes the VM where it would run. Domain code: reads the
database, changes nothing; never imports the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from vms import failover

ALERT_KIND = "failover-level"
# Host statuses of a failure under way or just happened (see `sync_alerts`).
FAILING = ("Down", "Alert", "Disconnected", "Error")


def _cfg(cfg, name, default):
    return failover._cfg(cfg, name, default)


@dataclass
class Verdict:
    cluster: str
    level: int
    capacity: int        # the cluster's failover capacity with the VM
    reason: str = ""     # why it falls below the level ("" when it does not)

    @property
    def below(self) -> bool:
        return self.capacity < self.level


def ha_wanted(ha_enabled: bool, cfg) -> bool:
    """R9: whether a VM with this flag is restarted by HA (and so counts in the plan)."""
    return bool(_cfg(cfg, "vm.ha.enabled", True)) and (
        bool(ha_enabled) or bool(_cfg(cfg, "force.ha", False)))


def assess(*, cluster: str, name: str, host_id: int, cpus: int, memory_mb: int,
           vm_id: int | None = None, vm_type: str = "User", priority: str = "medium",
           cfg) -> Verdict:
    """The cluster's failover capacity once the HA VM ``name`` (``vm_id`` when it
    exists) runs on ``host_id`` with this size — on a copy; nothing is written."""
    level = int(_cfg(cfg, "ha.failover.level", 1))
    states = failover.load([cluster], cfg=cfg)
    state = states.get(cluster)
    if state is None:
        return Verdict(cluster, level, failover.MAX_CAPACITY)
    rank = failover.vm_rank(vm_type, priority)
    mine = next((v for v in state.vms if vm_id is not None and v.id == vm_id), None)
    if mine is not None:
        mine.ha, mine.host_id, mine.cpus, mine.memory_mb = True, host_id, cpus, memory_mb
    else:
        state.vms.append(failover.VmCopy(vm_id if vm_id is not None else -1, name, host_id,
                                         cpus, memory_mb, True, rank))
    state.groups.clear()
    failover._load_groups({cluster: state})  # the VM's own groups count too (R25)
    plan = failover.compute(state)
    verdict = Verdict(cluster, level, plan.capacity)
    if verdict.below:
        verdict.reason = words(plan, name=name, level=level)
    return verdict


def words(plan: failover.Plan, *, name: str, level: int) -> str:
    """"cluster c1 would survive 0 host failures with vm-9 (level 1): if kvm-03
    failed, 2 of its 5 HA VMs would not fit"."""
    k = plan.capacity
    head = (f"cluster {plan.cluster} would survive {k} host failure{'s' if k != 1 else ''} "
            f"with {name} (level {level})")
    worst = plan.worst or {}
    failed = worst.get("failed") or []
    unfit, total = worst.get("unfit", 0), len(worst.get("placements") or {})
    if failed and unfit:
        who = " and ".join(failed)
        its = "its" if len(failed) == 1 else "their"
        return (f"{head}: if {who} failed, {unfit} of {its} {total} HA VM"
                f"{'s' if total != 1 else ''} would not fit")
    return f"{head}: some {k + 1} host{'s' if k + 1 != 1 else ''} failing together would " \
           "leave HA VMs without room"


def refusal(*, cluster: str | None, name: str, host_id: int | None, cpus: int,
            memory_mb: int, ha_enabled: bool, vm_id: int | None = None,
            vm_type: str = "User", priority: str = "medium", cfg) -> str:
    """R23 enforce: why this VM may not run (HA) on ``host_id`` — "" when it may:
    admission is not `enforce`, the level is 0, the VM is not HA, or the cluster keeps
    its level with it."""
    if _cfg(cfg, "ha.admission", "warn") != "enforce" or not cluster or host_id is None:
        return ""
    if int(_cfg(cfg, "ha.failover.level", 1)) <= 0 or not ha_wanted(ha_enabled, cfg):
        return ""
    verdict = assess(cluster=cluster, name=name, host_id=host_id, cpus=cpus,
                     memory_mb=memory_mb, vm_id=vm_id, vm_type=vm_type, priority=priority,
                     cfg=cfg)
    return verdict.reason


def refusal_for_vm(vm, *, host_id: int | None = None, ha_enabled: bool | None = None,
                   cfg) -> str:
    """`refusal` for an existing VM: started on ``host_id`` (default: where it is), or
    made HA-enabled (``ha_enabled``=True)."""
    host_id = host_id if host_id is not None else vm.host_id
    return refusal(cluster=vm.cluster, name=vm.name, host_id=host_id, cpus=vm.cpus,
                   memory_mb=vm.memory_mb,
                   ha_enabled=vm.ha_enabled if ha_enabled is None else ha_enabled,
                   vm_id=vm.pk, vm_type=vm.type, priority=vm.priority, cfg=cfg)


# --- the warn alert ---------------------------------------------------------------------

def sync_alerts(*, now, cfg) -> None:
    """R23 warn (and enforce: a host failure can still lower the capacity): the
    `failover-level` alert of each cluster is open while its stored plan's capacity is
    below ``ha.failover.level``, resolved when it is back (or admission is `off`, or
    the cluster is gone). Two queries when nothing changes."""
    from django.db import transaction

    from hadash import alerts
    from hadash.choices import AlertState, Severity, Subject
    from hadash.models import Alert

    from .models import FailoverPlan

    level = int(_cfg(cfg, "ha.failover.level", 1))
    mode = _cfg(cfg, "ha.admission", "warn")
    below = {}
    if mode != "off" and level > 0:
        for cluster, capacity, worst in FailoverPlan.objects.values_list(
                "cluster", "capacity", "worst"):
            if capacity < level:
                below[cluster] = (capacity, worst or {})
    open_now = {a.subject_name: a for a in Alert.objects.filter(
        kind=ALERT_KIND, subject=Subject.CLUSTER, state=AlertState.OPEN)}
    failing = set()
    if any(c not in open_now for c in below):
        from hosts.models import Host

        failing = set(Host.objects.filter(cluster__in=list(below), status__in=FAILING)
                      .values_list("cluster", flat=True).distinct())
    for cluster, (capacity, worst) in below.items():
        if cluster in failing and cluster not in open_now:
            continue  # the failure's incident tells it (R19)
        title = (f"Cluster {cluster} below its failover level: survives {capacity} host "
                 f"failure{'s' if capacity != 1 else ''}, level {level}")
        old = open_now.get(cluster)
        if old is not None and old.title == title:
            continue
        detail = worst.get("summary", "")
        failed = ", ".join(worst.get("failed") or [])
        message = (f"If {failed} failed: {detail}" if failed and detail else detail) + \
            (f" (ha.admission {mode})")
        with transaction.atomic():
            alerts.open_alert(ALERT_KIND, Subject.CLUSTER, cluster, now=now, title=title,
                              message=message, severity=Severity.WARNING, cluster=cluster)
    for cluster in open_now:
        if cluster not in below:
            with transaction.atomic():
                alerts.resolve_alert(ALERT_KIND, Subject.CLUSTER, cluster, now=now,
                                     message=f"Cluster {cluster} meets its failover level "
                                             f"again (or admission is off)")
