"""Power-state sync (R8–R9, CloudStack's VirtualMachinePowerStateSyncImpl).

`process_report` runs inside the transaction of a ping (or connect): it updates the
power state of the VMs a host reports, marks the ones it leaves out as missing, and
applies R9 to every VM whose database state and power state disagree.
"""

from __future__ import annotations

import datetime as dt
import logging

from django.db import models

from hadash.choices import FINAL_STEPS, Reason, WorkType
from hadash.clock import not_before
from hadash.models import HaWork

from .choices import POWERED_OFF_STATES, REPORTED_STATES, PowerState, VmState
from .models import VMInstance

log = logging.getLogger("hadash.powersync")


def ha_wanted(vm: VMInstance, cfg) -> bool:
    """R9/R12.4: the VM is to be restarted by HA."""
    return bool(cfg["vm.ha.enabled"]) and (vm.ha_enabled or bool(cfg["force.ha"]))


def process_report(host, report: list[tuple[str, str]], *, now: dt.datetime,
                   cfg) -> set[str]:
    """R8/R9: apply a host's power report. Returns the reported names hadash manages
    (discovery's ``known``: read here anyway)."""
    reported = dict(report)
    missing_after = dt.timedelta(seconds=2 * cfg["ping.interval"])
    vms = list(
        VMInstance.objects.select_related("host", "last_host").filter(
            models.Q(name__in=list(reported)) | models.Q(host=host, state__in=REPORTED_STATES)
        )
    )
    confirmed: list[int] = []  # reported again, unchanged: refreshed in one UPDATE
    busy = set(
        HaWork.objects.filter(instance__in=vms)
        .exclude(step__in=FINAL_STEPS)
        .values_list("instance_id", flat=True)
    )
    for vm in vms:
        ps = reported.get(vm.name)
        if ps is None:
            # R8: left out of the report.
            if vm.host_id != host.pk or vm.state not in REPORTED_STATES:
                continue
            if vm.power_state == PowerState.POWER_REPORT_MISSING:
                pass
            elif vm.power_state_update_time and now - vm.power_state_update_time <= missing_after:
                continue
            else:
                _set_power(vm, host, PowerState.POWER_REPORT_MISSING, now)
        elif vm.host_id is not None and vm.host_id != host.pk:
            # The VM lives on another host. PowerOff from here is stale (R8);
            # PowerOn is a second copy, which must never run (R6).
            if ps == PowerState.POWER_ON and vm.state in (
                VmState.RUNNING, VmState.STARTING, VmState.STOPPING
            ):
                HaWork.objects.schedule_force_stop(vm, host, now=now)
            continue
        elif vm.power_state == ps and vm.power_host_id == host.pk:
            confirmed.append(vm.pk)
        else:
            _set_power(vm, host, ps, now)
        if vm.pk in busy:
            # R9: a VM with an unfinished work item is left to that item — except a
            # Stopped VM that a host reports running: it is Running there (so the
            # item, seeing the VM changed, ends without starting a second copy).
            if not (vm.state == VmState.STOPPED and vm.power_state == PowerState.POWER_ON):
                continue
        apply_power_rules(vm, now=now, cfg=cfg)
    if confirmed:
        # The power state of these VMs was confirmed now (R8 measures "missing" from
        # the last confirmation): one statement for all of them.
        # A report applied late (it carries its arrival time) never moves it back.
        VMInstance.objects.filter(pk__in=confirmed).update(
            power_state_update_time=not_before("power_state_update_time", now),
            power_state_update_count=models.F("power_state_update_count") + 1,
        )
    return {vm.name for vm in vms if vm.name in reported}


def _set_power(vm: VMInstance, host, ps: str, now) -> None:
    """Store a reported power state; an event when it changed."""
    from hadash.choices import Subject
    from hadash.events import record_event

    old = vm.power_state
    # R18: the last confirmation of the old power state (a VM incident starts there).
    vm.confirmed_until = vm.power_state_update_time
    vm.power_state, vm.power_host, vm.power_state_update_time = ps, host, now
    vm.power_state_update_count = 1
    VMInstance.objects.filter(pk=vm.pk).update(
        power_state=ps, power_host=host, power_state_update_time=now, power_state_update_count=1
    )
    record_event(
        Subject.VM, vm, event="PowerStateChanged", field="power_state", old=old, new=ps,
        message=f"VM {vm.name}: power {old} → {ps} (reported by {host.name})", now=now,
        related_host=host,
    )


def apply_power_rules(vm: VMInstance, *, now, cfg) -> None:
    """R9, for a VM with no unfinished work item."""
    ps = vm.power_state
    if ps in POWERED_OFF_STATES:
        if vm.state == VmState.RUNNING:
            if ha_wanted(vm, cfg) and cfg["ha.vm.restart.hostup"]:
                reason = (
                    Reason.VM_POWER_OFF if ps == PowerState.POWER_OFF else Reason.VM_REPORT_MISSING
                )
                item = HaWork.objects.schedule_restart(vm, investigate=True, reason=reason,
                                                       now=now, cfg=cfg)
                if item is not None:
                    # R18: a VM incident, started at the VM's last power confirmation.
                    from hadash import incidents

                    incidents.open_vm_incident(
                        vm, item, now=now,
                        started_at=getattr(vm, "confirmed_until", None)
                        or vm.power_state_update_time,
                        why="powered off" if ps == PowerState.POWER_OFF else "went missing")
            else:
                mark_stopped(vm, now=now, why=f"out-of-band stop ({ps})")
        elif vm.state in (VmState.STARTING, VmState.STOPPING, VmState.MIGRATING):
            mark_stopped(vm, now=now, why=f"the agent reports {ps}")
    elif ps == PowerState.POWER_ON and vm.state in (
        VmState.STOPPED, VmState.STARTING, VmState.STOPPING, VmState.MIGRATING
    ):
        vm.transition(
            VmState.RUNNING, now=now, event="OutOfBandStart", host=vm.power_host,
            reason="PowerOn reported",
            message=f"VM {vm.name}: {vm.state} → Running on {vm.power_host} (out-of-band start)",
        )


def mark_stopped(vm: VMInstance, *, now, why: str, event: str = "OutOfBandStop") -> bool:
    old_host = vm.host or vm.last_host
    return vm.transition(
        VmState.STOPPED, now=now, event=event, host=None, last_host=old_host, reason=why,
        message=f"VM {vm.name}: {vm.state} → Stopped ({why})",
    )


__all__ = ["process_report", "apply_power_rules", "mark_stopped", "ha_wanted", "WorkType"]
