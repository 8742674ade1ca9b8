"""What a worker does with each type of work item (R12, R15, operator stops).

A handler runs with its item claimed; it does I/O outside transactions and commits
each change together with its event through `work.set_step`/`mark_vm`/`retry`.
"""

from __future__ import annotations

import datetime as dt
import logging

from django.db import transaction

from hadash import incidents
from hadash.choices import Severity, Step, Subject, WaitCause, WorkType
from hadash.events import record_event
from hosts.choices import HostEvent, HostStatus, Verdict
from hosts.investigators import investigate_vm
from hosts.models import Host
from hosts.transport import AgentError, Unreachable
from vms import definitions
from vms.choices import PowerState, VmState
from vms.models import VMInstance
from vms.powersync import ha_wanted

from . import brake, maintenance, modes, placement_guard
from .work import (
    backoff_seconds,
    finish,
    mark_vm,
    retry,
    set_step,
    stopped_fields,
)

log = logging.getLogger("hadash.handlers")


def _load(item):
    vm = VMInstance.objects.select_related("host", "last_host").get(pk=item.instance_id)
    item.instance = vm
    if item.host_id and item.host_id == vm.host_id:
        host = vm.host  # read with the VM
    else:
        host = Host.objects.filter(pk=item.host_id).first() if item.host_id else None
    item.host = host
    return vm, host


# --- HA (R12) ------------------------------------------------------------------------------

def handle_ha(engine, item, cfg) -> None:
    vm, host = _load(item)
    now = engine.now()
    # R12.1: someone else acted on the VM since scheduling.
    if (vm.state, vm.update_count) != (item.state, item.update_count):
        finish(item, Step.DONE, now=now,
               message=f"HA work #{item.pk}: VM {vm.name} changed since scheduling "
                       f"({item.state} → {vm.state}); nothing to do")
        return
    # R26: observe records what would be done; disarmed holds items not yet past
    # Investigating. Both without sending anything.
    if modes.hold(engine, item, vm, host, now=now, cfg=cfg):
        return
    # An item that reached Restarting before is resumed: its start may have been sent
    # already (the worker then lost its database connection or died).
    resumed = item.step == Step.RESTARTING
    while True:
        now = engine.now()
        step = item.step
        if step == Step.INVESTIGATING:
            verdict, by = investigate_vm(engine, vm, host, now=now, cfg=cfg)
            if verdict == Verdict.ALIVE:
                if host and host.status == HostStatus.UP:
                    finish(item, Step.DONE, now=now,
                           message=f"VM {vm.name} is alive on {host.name} ({by}); nothing "
                                   "to do")
                else:
                    where = f"{host.name} is {host.status}" if host else "it has no host"
                    retry(item, now=now, after=cfg["investigate.retry.interval"],
                          waiting=WaitCause.HOST_UNREACHABLE,
                          message=f"VM {vm.name} is alive ({by}) but {where}: not "
                                  "restarted while it may run")
                return
            if verdict == Verdict.DEAD and by == "OutOfBand" and host is not None \
                    and host.status != HostStatus.DOWN:
                # R27: its host's BMC reports power Off — proof the host is fenced;
                # the fencing step records it (and sends no ForceOff).
                set_step(item, Step.FENCING, now=now,
                         message=f"VM {vm.name}: the BMC of {host.name} reports power Off; "
                                 "its host counts as fenced")
            elif verdict == Verdict.DEAD and (host is None or host.status == HostStatus.DOWN):
                # Nothing to ask the old host (R12.3): the Stopping step, the stop and
                # Scheduled commit together — one transaction, not three (issue 12: a
                # failed host's VMs on their way to placement).
                with transaction.atomic():
                    set_step(item, Step.STOPPING, now=now,
                             message=f"VM {vm.name} is dead ({by}); stopping it")
                    if not force_stop(engine, item, vm, host, now=now):
                        return
            elif verdict == Verdict.DEAD:
                set_step(item, Step.STOPPING, now=now,
                         message=f"VM {vm.name} is dead ({by}); stopping it")
            else:
                set_step(item, Step.FENCING, now=now,
                         message=f"VM {vm.name}: cannot tell whether it runs; fencing "
                                 f"{host.name if host else 'its host'}")
        elif step == Step.FENCING:
            if not fence(engine, item, host, now=now, cfg=cfg):
                return
            host.refresh_from_db()
            set_step(item, Step.STOPPING, now=now,
                     message=f"{host.name} fenced; stopping VM {vm.name}")
        elif step == Step.STOPPING:
            if not force_stop(engine, item, vm, host, now=now):
                return
        elif step == Step.SCHEDULED:
            if vm.state != VmState.STOPPED:
                # Scheduled without investigation: stop it first (R12.3).
                set_step(item, Step.STOPPING, now=now)
                continue
            if not ha_wanted(vm, cfg):
                finish(item, Step.DONE, now=now,
                       message=f"VM {vm.name} is not HA-enabled; it stays Stopped")
                return
            if not place_and_start(engine, item, vm, now=now, cfg=cfg):
                return
        elif step == Step.RESTARTING:
            start_on_target(engine, item, vm, now=now, cfg=cfg, resumed=resumed)
            return
        else:
            finish(item, Step.ERROR, now=now,
                   message=f"HA work #{item.pk} in unexpected step {step}")
            return


def fence(engine, item, host, *, now, cfg) -> bool:
    """R12.2: out-of-band power off. A VM is never started elsewhere while its old
    host might still run it: no fence, no restart."""
    if host is None:
        return True
    if host.status == HostStatus.DOWN:
        return True
    # R27: a BMC that reports power Off is proof enough; no ForceOff is sent.
    off = engine.oob.power_state(host) == "Off"
    if off or engine.oob.power_off(host):
        from hosts.liveness import host_down

        now = engine.now()
        with transaction.atomic():
            # R18: fenced_at on the host's incident (notified "fenced"), then HostDown
            # declares it — one transaction.
            incident = incidents.host_fenced(host, now=now, by=f"VM {item.instance.name}")
            how = ("fenced: BMC reports power Off, no ForceOff needed" if off
                   else "fenced (out-of-band power off)")
            record_event(Subject.HOST, host, event=HostEvent.FENCED, reason="HA", now=now,
                         severity=Severity.WARNING, incident=incident,
                         message=f"Host {host.name} {how} for VM {item.instance.name}")
            host.refresh_from_db()
            host_down(host, now=now, cfg=cfg,
                      by="fenced: BMC reports power Off" if off else "fenced")
        return True
    now = engine.now()
    why = "its BMC did not power it off (unreachable, or refused)"
    with transaction.atomic():
        incident = incidents.fence_failed(host, now=now, why=why,
                                          incident=item.incident_id and item.incident)
        record_event(Subject.HOST, host, event=HostEvent.FENCE_FAILED, reason="HA", now=now,
                     severity=Severity.CRITICAL, incident=incident,
                     message=f"Fencing {host.name} failed: VM {item.instance.name} cannot be "
                             "restarted while its host might still run it")
        retry(item, now=now, after=cfg["restart.retry.interval"],
              waiting=WaitCause.FENCING_FAILED,
              message=f"fencing {host.name} failed: {why}; VM {item.instance.name} is not "
                      "started elsewhere while its host might still run it")
    return False


def force_stop(engine, item, vm, host, *, now) -> bool:
    """R12.3: make the old host forget the VM if it answers; mark it Stopped, and the
    item Scheduled (one transaction). False when the VM changed meanwhile (the item is
    then Done)."""
    if host is not None and host.status != HostStatus.DOWN:
        try:
            engine.agents.stop_vm(host, vm.name, force=True)
        except (Unreachable, AgentError) as exc:
            log.info("force stop of %s on %s: %s", vm.name, host.name, exc)
    now = engine.now()
    with transaction.atomic(savepoint=False):
        if vm.state != VmState.STOPPED:
            if not mark_vm(vm, item, VmState.STOPPED, now=now, event="HaStopped",
                           message=f"VM {vm.name} stopped by HA (was on "
                                   f"{host.name if host else '?'})",
                           step=Step.SCHEDULED, **stopped_fields(vm)):
                finish(item, Step.DONE, now=now,
                       message=f"VM {vm.name} changed while HA was stopping it; nothing "
                               "to do")
                return False
            incidents.vm_stopped_by_ha(item, now=now)
        else:
            set_step(item, Step.SCHEDULED, now=now)
    return True


def place_and_start(engine, item, vm, *, now, cfg) -> bool:
    """R13/R14: choose a host and reserve it; then go on to Restarting. R25: waits
    for higher priorities under strict restart order, and for a host its
    anti-affinity groups allow."""
    cluster = vm.cluster
    if brake.is_braked(cluster, now=now, cfg=cfg):
        retry(item, now=now, after=cfg["investigate.retry.interval"],
              waiting=WaitCause.BRAKED,
              message=f"{brake.WAITING} in cluster {cluster}: {brake.ratio_words(cluster, cfg)}"
                      "; restart paused")
        return False
    # R25: with ha.restart.order = strict, a lower priority waits for the higher ones
    # of its incident (at most ha.restart.order.timeout).
    wait = placement_guard.order_wait(item, now=now, cfg=cfg)
    if wait is not None:
        words, after = wait
        retry(item, now=now, after=after, waiting=WaitCause.ORDER,
              message=f"VM {vm.name} {words}")
        return False
    target = placement_guard.reserve(vm, item, ha=True, now=now, cfg=cfg, clock=engine.now)
    if target is None:
        # R17/R25: no room, or room only where a member of its anti-affinity group runs.
        cause, words = placement_guard.why_none(vm, ha=True, cfg=cfg)
        if cause == WaitCause.ANTI_AFFINITY:
            message = f"VM {vm.name} cannot restart in cluster {cluster}: {words}"
        else:
            message = f"no host has room for VM {vm.name} in cluster {cluster}: {words}"
        retry(item, now=now, after=cfg["restart.retry.interval"], waiting=cause,
              message=message)
        return False
    return True


def start_on_target(engine, item, vm, *, now, cfg, resumed: bool = False) -> None:
    """R12.5: start the VM on the reserved host. A resumed item asks the host first:
    a VM it already runs is not started a second time (the start of the interrupted
    attempt went through), only recorded as Running."""
    # The host placement locked a moment ago (set on the item by reserve); a resumed
    # item reads it.
    target = item.target_host if not resumed else Host.objects.get(pk=item.target_host_id)
    if resumed and _runs_on(engine, target, vm.name):
        ok, error = True, ""
        log.info("HA work #%s: VM %s already runs on %s; not started again", item.pk,
                 vm.name, target.name)
    else:
        try:
            # PROTOCOL.md v1.1: the stored definition goes with the start (an agent
            # client written before v1.1 is called as before when there is none). A VM
            # that had none when this item loaded it is not asked again (issue 12: one
            # query on the way to the start call); the XML is read only when there is one.
            definition = definitions.of_vm(vm) if vm.has_definition else None
            engine.agents.start_vm(target, vm, **({"definition": definition} if definition else {}))
            ok, error = True, ""
        except (Unreachable, AgentError) as exc:
            ok, error = False, str(exc) or type(exc).__name__
    now = engine.now()
    vm.refresh_from_db()
    if ok:
        with transaction.atomic():
            mark_vm(vm, item, VmState.RUNNING, now=now, event="HaStarted",
                    message=f"HA started VM {vm.name} on {target.name}",
                    power_state=PowerState.POWER_ON, power_host=target,
                    power_state_update_time=now, power_state_update_count=1)
            # R18/R19: an info event of the VM's incident, not an alert of its own.
            count_restart = incidents.vm_restarted(item, vm, target, now=now)
            finish(item, Step.DONE, now=now, settled=True,
                   message=f"HA work #{item.pk}: VM {vm.name} Running on {target.name}")
            count_restart()  # last: the incident row is locked until the commit
        return
    tried = item.tried + 1
    limit = cfg["vm.ha.migration.max.retries"]
    with transaction.atomic():
        # The target's row first, as host_down takes it: a target found Down before
        # this commits is seen Down here; one found Down after it finds this item
        # waiting (HaWorkManager.retry_starts_on). Either way the VM goes elsewhere at
        # once — the host is dead, its VMs with it (R4, R12.2) — not after the back-off.
        gone = Host.objects.select_for_update(no_key=True).filter(pk=target.pk) \
            .values_list("status", flat=True).first() in (HostStatus.DOWN, None)
        mark_vm(vm, item, VmState.STOPPED, now=now, event="HaStartFailed",
                message=f"Starting VM {vm.name} on {target.name} failed: {error}",
                host=None, last_host=target)
        incidents.restart_failed(item, vm, now=now, error=error)
        if tried >= limit:
            _update_tried(item, tried, now)
            finish(item, Step.ERROR, now=now,
                   message=f"HA gave up on VM {vm.name} after {tried} failed start(s); "
                           f"last error: {error}")
            return
        if gone:
            retry(item, now=now, after=0, tried=tried, step=Step.SCHEDULED,
                  message=f"start on {target.name} failed ({error}) and {target.name} is "
                          f"Down; try {tried} of {limit} now, elsewhere")
            return
        after = backoff_seconds(cfg, tried)
        at = (now + dt.timedelta(seconds=after)).strftime("%H:%M:%S")
        retry(item, now=now, after=after, tried=tried, step=Step.SCHEDULED,
              waiting=WaitCause.BACKOFF,
              message=f"start on {target.name} failed ({error}); try {tried} of {limit}, "
                      f"next at {at}")


def _runs_on(engine, host, vm_name: str) -> bool:
    """Whether ``host``'s agent reports the VM PowerOn (False when it cannot say)."""
    try:
        return engine.agents.get_vm(host, vm_name) == PowerState.POWER_ON
    except (Unreachable, AgentError) as exc:
        log.info("asking %s about %s: %s", host.name, vm_name, exc)
        return False


def _update_tried(item, tried, now):
    from .work import _update

    _update(item, now, tried=tried)


# --- Migration (R15) -------------------------------------------------------------------------

def handle_migration(engine, item, cfg) -> None:
    vm, source = _load(item)
    now = engine.now()
    if not maintenance.emptying(source):  # R15: cancelled with maintenance
        finish(item, Step.CANCELLED, now=now,
               message=f"Migration of {vm.name} cancelled: host no longer preparing for "
                       "maintenance")
        return
    if vm.host_id != source.pk or vm.state not in (VmState.RUNNING, VmState.MIGRATING):
        finish(item, Step.DONE, now=now,
               message=f"VM {vm.name} is no longer running on {source.name}")
        maintenance.complete_if_ready(source, now=now)
        return
    # Migrating already: a resumed item (the worker lost its connection or died).
    resumed = vm.state == VmState.MIGRATING
    if vm.state == VmState.RUNNING:
        target = placement_guard.pick(vm, ha=False, cfg=cfg, exclude=(source.pk,))
        if target is None:
            # R15: "no host has room" is a failed migration (no try counted, as R13).
            words = placement_guard.no_room(vm, ha=False, cfg=cfg, exclude=(source.pk,))
            with transaction.atomic():
                maintenance.migration_failed(source, now=now,
                                             why=f"no host has room for VM {vm.name}")
                retry(item, now=now, after=cfg["migrate.retry.interval"],
                      waiting=WaitCause.NO_CAPACITY,
                      message=f"no host has room to migrate {vm.name} to: {words}")
            return
        with transaction.atomic():
            if not mark_vm(vm, item, VmState.MIGRATING, now=now, event="MigrationStarted",
                           message=f"VM {vm.name} migrating {source.name} → {target.name}"):
                finish(item, Step.DONE, now=now, message=f"VM {vm.name} changed; not migrated")
                return
            set_step(item, Step.MIGRATING, now=now, target_host=target,
                     placement=getattr(target, "placement_reason", ""))
    if resumed:  # the target chosen by the interrupted attempt
        target = Host.objects.get(pk=item.target_host_id)
    if resumed and _runs_on(engine, target, vm.name):
        ok, error = True, ""  # the interrupted attempt's migration went through
    else:
        try:
            engine.agents.migrate_vm(source, vm.name, target)
            ok, error = True, ""
        except (Unreachable, AgentError) as exc:
            ok, error = False, str(exc) or type(exc).__name__
    now = engine.now()
    vm.refresh_from_db()
    if ok:
        with transaction.atomic():
            mark_vm(vm, item, VmState.RUNNING, now=now, event="Migrated",
                    message=f"VM {vm.name} migrated {source.name} → {target.name}",
                    host=target, last_host=source, power_state=PowerState.POWER_ON,
                    power_host=target, power_state_update_time=now, power_state_update_count=1)
            finish(item, Step.DONE, now=now,
                   message=f"Migration of {vm.name} to {target.name} done")
        maintenance.complete_if_ready(source, now=now)
        return
    # R15: ErrorInMaintenance while the work keeps retrying every migrate.retry.interval.
    with transaction.atomic():
        mark_vm(vm, item, VmState.RUNNING, now=now, event="MigrationFailed",
                message=f"Migration of {vm.name} to {target.name} failed: {error}")
        maintenance.migration_failed(
            source, now=now, why=f"migration of {vm.name} to {target.name} failed: {error}")
        retry(item, now=now, after=cfg["migrate.retry.interval"], step=Step.SCHEDULED,
              tried=item.tried + 1, waiting=WaitCause.BACKOFF,
              message=f"migration of {vm.name} to {target.name} failed ({error}); "
                      f"try {item.tried + 1}")


# --- Stop, ForceStop, CheckStop, Destroy ------------------------------------------------------

def handle_stop(engine, item, cfg) -> None:
    vm, host = _load(item)
    now = engine.now()
    kind = item.type
    if kind == WorkType.FORCE_STOP:
        # R6: a second copy on item.host; the VM's own record is not touched.
        try:
            engine.agents.stop_vm(host, vm.name, force=True)
        except (Unreachable, AgentError) as exc:
            _stop_retry(item, cfg, now, f"stopping the copy of {vm.name} on {host}: {exc}")
            return
        finish(item, Step.DONE, now=engine.now(),
               message=f"Second copy of VM {vm.name} on {host.name} stopped")
        return
    if vm.state in (VmState.STOPPED, VmState.DESTROYED, VmState.EXPUNGING) and \
            kind != WorkType.DESTROY:
        finish(item, Step.DONE, now=now, message=f"VM {vm.name} is already {vm.state}")
        return
    on = vm.host
    if on is not None and vm.state != VmState.STOPPED:
        if vm.state != VmState.STOPPING:
            if not mark_vm(vm, item, VmState.STOPPING, now=now, event="StopRequested",
                           message=f"VM {vm.name} stopping on {on.name}"):
                finish(item, Step.DONE, now=now, message=f"VM {vm.name} changed; not stopped")
                return
        try:
            if kind == WorkType.CHECK_STOP:
                if engine.agents.get_vm(on, vm.name) == PowerState.POWER_ON:
                    engine.agents.stop_vm(on, vm.name, force=True)
            else:
                engine.agents.stop_vm(on, vm.name, force=kind != WorkType.STOP)
        except (Unreachable, AgentError) as exc:
            _stop_retry(item, cfg, engine.now(), f"stopping {vm.name} on {on.name}: {exc}")
            return
        now = engine.now()
        vm.refresh_from_db()
        mark_vm(vm, item, VmState.STOPPED, now=now, event="Stopped",
                message=f"VM {vm.name} stopped on {on.name}", **stopped_fields(vm))
    if kind == WorkType.DESTROY:
        vm.refresh_from_db()
        mark_vm(vm, item, VmState.DESTROYED, now=now, event="Destroyed",
                message=f"VM {vm.name} destroyed")
    finish(item, Step.DONE, now=engine.now(), message=f"{kind} of VM {vm.name} done")


def _stop_retry(item, cfg, now, message) -> None:
    tried = item.tried + 1
    limit = cfg["vm.ha.migration.max.retries"]
    if tried >= limit:
        _update_tried(item, tried, now)
        finish(item, Step.ERROR, now=now,
               message=f"{item.type} of VM {item.instance.name} gave up after {tried} tries: "
                       f"{message}")
        return
    after = cfg["stop.retry.interval"]
    at = (now + dt.timedelta(seconds=after)).strftime("%H:%M:%S")
    retry(item, now=now, after=after, tried=tried, waiting=WaitCause.BACKOFF,
          message=f"{message}; try {tried} of {limit}, next at {at}")


HANDLERS = {
    WorkType.HA: handle_ha,
    WorkType.MIGRATION: handle_migration,
    WorkType.STOP: handle_stop,
    WorkType.FORCE_STOP: handle_stop,
    WorkType.CHECK_STOP: handle_stop,
    WorkType.DESTROY: handle_stop,
}
