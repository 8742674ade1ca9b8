"""Operator actions (API, admin, scenario runner): thin, validated entry points into
the engine. Each commits its state change with its event."""

from __future__ import annotations


class ActionError(ValueError):
    """An action that cannot be done as asked; the message says why (API: 400/409)."""


class AdmissionRefused(ActionError):
    """R23 enforce: the HA VM would push its cluster's failover capacity below
    ha.failover.level (API: 409 with the reason)."""


def admit(reason: str) -> None:
    """Raise AdmissionRefused with ``reason`` (clusters.admission's words), if any."""
    if reason:
        raise AdmissionRefused(f"refused by admission control (ha.admission enforce): "
                               f"{reason}")


def register_vm(*, name, host_name, cpus, memory_mb, ha_enabled=False, priority="medium",
                type="User", now, definition=None, message="", admission=True):
    """Register a VM that runs on ``host_name`` (state Running, PowerOn).
    ``definition``: (format, xml) stored with it, from that host (issue 9 adoption).
    R23: an HA VM that would push the cluster below its failover level is refused
    under ``ha.admission`` enforce (AdmissionRefused); ``admission=False`` describes
    the world as it is (a scenario's set-up)."""
    from django.db import IntegrityError, transaction

    from hadash.choices import Subject
    from hadash.events import record_event
    from hosts.models import Host
    from vms.choices import PowerState, Priority, VmState, VmType
    from vms.models import VMInstance

    if not isinstance(name, str) or not name.strip() or len(name) > 255:
        raise ActionError("name must be a non-empty string of at most 255 characters")
    if priority not in Priority.values:
        raise ActionError(f"priority must be one of {', '.join(Priority.values)}")
    if type not in VmType.values:
        raise ActionError(f"type must be one of {', '.join(VmType.values)}")
    for field, value in (("cpus", cpus), ("memory_mb", memory_mb)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ActionError(f"{field} must be a whole number of at least 1")
    host = Host.objects.filter(name=host_name).first()
    if host is None:
        raise ActionError(f"unknown host {host_name!r}")
    if admission and not VMInstance.objects.filter(name=name).exists():
        from clusters import admission as r23
        from hadash import config

        admit(r23.refusal(cluster=host.cluster, name=name, host_id=host.pk, cpus=cpus,
                          memory_mb=memory_mb, ha_enabled=ha_enabled, vm_type=type,
                          priority=priority, cfg=config.snapshot()))
    try:
        with transaction.atomic():
            vm = VMInstance.objects.create(
                name=name, host=host, last_host=host, state=VmState.RUNNING,
                power_state=PowerState.POWER_ON, power_host=host, power_state_update_time=now,
                power_state_update_count=1, ha_enabled=bool(ha_enabled), priority=priority,
                type=type, cpus=cpus, memory_mb=memory_mb,
                **({"definition_format": definition[0], "definition_xml": definition[1],
                    "definition_time": now, "definition_host": host} if definition else {}),
            )
            record_event(Subject.VM, vm, event="Registered", field="state", old="",
                         new=VmState.RUNNING, now=now,
                         message=message or f"VM {name} registered, Running on {host.name}")
    except IntegrityError:
        raise ActionError(f"a VM named {name!r} already exists") from None
    return vm


def adopt_vms(entries, *, now, by=""):
    """Issue 9 part 2: adopt unmanaged VMs — each ``{"name", "host", "ha_enabled",
    "priority", "cpus"?, "memory_mb"?}`` (validated by the caller) — all in one
    transaction: any entry that cannot be adopted refuses the whole request
    (ActionError naming it) and nothing is written. Each VM is registered Running on
    the host that reports it (as `register_vm`), with the definition that host sent;
    its size comes from the definition when it says, else from the entry."""
    from django.db import transaction

    from vms import definitions, discovery
    from vms.choices import PowerState, VmState
    from vms.models import UnmanagedVm

    names = [e["name"] for e in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ActionError(f"{', '.join(dupes)}: named more than once")
    adopted = []
    with transaction.atomic():
        for i, e in enumerate(entries):
            where = f"vms[{i}] ({e['name']} on {e['host']})"
            row = discovery.listed(now=now).filter(name=e["name"], host__name=e["host"]).first()
            if row is None:
                raise ActionError(f"{where}: no such unmanaged VM (not reported by that "
                                  "host lately, or already managed)")
            fmt, xml = UnmanagedVm.objects.filter(pk=row.pk).values_list(
                "definition_format", "definition_xml").get()
            cpus, memory_mb = definitions.size_of(xml) if fmt else (None, None)
            cpus = cpus or e.get("cpus")
            memory_mb = memory_mb or e.get("memory_mb")
            if not cpus or not memory_mb:
                raise ActionError(f"{where}: give cpus and memory_mb (no definition says "
                                  "them)")
            try:
                vm = register_vm(
                    name=e["name"], host_name=e["host"], cpus=cpus, memory_mb=memory_mb,
                    ha_enabled=e.get("ha_enabled", False),
                    priority=e.get("priority", "medium"), now=now,
                    definition=(fmt, xml) if fmt else None,
                    message=(f"VM {e['name']} adopted{' by ' + by if by else ''}, Running on "
                             f"{e['host']} (HA {'on' if e.get('ha_enabled') else 'off'})"),
                )
            except ActionError as exc:  # AdmissionRefused stays one (R23: 409)
                raise type(exc)(f"{where}: {exc}") from None
            if row.power_state != PowerState.POWER_ON:
                # Powered off there: adopted Stopped (last on that host), so HA does
                # not "restart" a VM nobody was running.
                vm.transition(VmState.STOPPED, now=now, event="Adopted", host=None,
                              last_host=vm.host, power_state=row.power_state,
                              message=f"VM {vm.name} adopted Stopped: it is powered off "
                                      f"on {e['host']}")
            UnmanagedVm.objects.filter(name=e["name"]).delete()
            adopted.append(vm)
    return adopted


def set_host_enabled(host, enabled: bool, *, now, by=""):
    from hosts.choices import ResourceState

    to = ResourceState.ENABLED if enabled else ResourceState.DISABLED
    allowed = (ResourceState.ENABLED, ResourceState.DISABLED)
    if host.resource_state not in allowed:
        raise ActionError(
            f"host {host.name} is {host.resource_state}; cancel maintenance first"
        )
    if host.resource_state != to:
        host.set_resource_state(to, now=now, reason=by, expect=allowed,
                                message=f"Host {host.name}: {host.resource_state} → {to}"
                                        f"{' by ' + by if by else ''}")
    host.refresh_from_db()
    return host


def maintenance_refusal(host) -> str:
    """Why R15 maintenance cannot start on this host ("" when it can): it live-migrates
    the host's running VMs, which needs the host Up — a Down, Alert or Disconnected
    host's VMs are HA's business (R5), not a migration's."""
    from hosts.choices import HostStatus

    if host.status != HostStatus.UP:
        return (f"host {host.name} is {host.status}: maintenance live-migrates its running "
                "VMs, which needs the host Up (R15); disable it instead to keep new VMs off it")
    return ""


def prepare_maintenance(host, *, now, by=""):
    """R15: PrepareForMaintenance and Migration work for every running VM."""
    from django.db import transaction

    from hadash.ha import maintenance, work
    from hosts.choices import ResourceState
    from vms.choices import VmState
    from vms.models import VMInstance

    allowed = (ResourceState.ENABLED, ResourceState.DISABLED, ResourceState.ERROR_IN_MAINTENANCE)
    if host.resource_state not in allowed:
        raise ActionError(f"host {host.name} is already {host.resource_state}")
    refusal = maintenance_refusal(host)
    if refusal:
        raise ActionError(refusal)
    with transaction.atomic():
        if not host.set_resource_state(
            ResourceState.PREPARE_FOR_MAINTENANCE, now=now, reason=by, expect=allowed,
            message=f"Host {host.name}: preparing for maintenance{' (' + by + ')' if by else ''}",
        ):
            raise ActionError(f"host {host.name} changed meanwhile; try again")
        for vm in VMInstance.objects.filter(host=host, state=VmState.RUNNING):
            work.schedule_migration(vm, now=now)
    maintenance.complete_if_ready(host, now=now)
    host.refresh_from_db()
    return host


def cancel_maintenance(host, *, now, by=""):
    """R15: Enabled, and the host's unfinished Migration work cancelled (step Cancelled,
    each with its event), as CloudStack's cancelScheduledMigrations. A migration that a
    live worker is carrying out at this moment cannot be called back: it ends by itself
    (Done if it moved the VM; a failure is no longer retried, since the host is no
    longer being emptied)."""
    from django.db import transaction
    from django.db.models import Q

    from hadash.choices import FINAL_STEPS, Step, WorkType
    from hadash.ha import maintenance, work
    from hadash.models import HaWork
    from hosts.choices import ResourceState

    host.refresh_from_db()
    allowed = (ResourceState.PREPARE_FOR_MAINTENANCE, ResourceState.MAINTENANCE,
               ResourceState.ERROR_IN_MAINTENANCE)
    if host.resource_state not in allowed:
        raise ActionError(f"host {host.name} is not in maintenance ({host.resource_state})")
    with transaction.atomic():
        if not host.set_resource_state(
            ResourceState.ENABLED, now=now, reason=by, expect=allowed,
            message=f"Host {host.name}: maintenance cancelled{' by ' + by if by else ''}",
        ):
            raise ActionError(f"host {host.name} changed meanwhile; try again")
        # R19: its ErrorInMaintenance alert, if any, resolves with the cancel.
        maintenance.maintenance_over(host, now=now,
                                     why=f"maintenance cancelled{' by ' + by if by else ''}")
        not_held = Q(taken__isnull=True) | Q(taken__lt=now - work.WORK_LEASE)
        for item in HaWork.objects.select_related("instance", "host").filter(
            not_held, host=host, type=WorkType.MIGRATION
        ).exclude(step__in=FINAL_STEPS):
            try:
                work.finish(item, Step.CANCELLED, now=now,
                            message=f"Migration of {item.instance.name} cancelled with "
                                    f"the maintenance of {host.name}")
            except work.LostItem:
                pass  # a worker took it meanwhile: it finds the host Enabled and cancels it
    host.refresh_from_db()
    return host


def cancel_ha_work(vm, *, now, by=""):
    """R15a: cancel the VM's unfinished HA item, whatever its step and whoever holds it
    (step Cancelled, with its event). Returns the cancelled item, or None when the VM
    had none. A worker holding the item loses it and drops its result."""
    from hadash.choices import Step, WorkType
    from hadash.models import HaWork

    from . import work

    who = f" by {by}" if by else ""
    for _ in range(10):  # a worker may change the item between our read and our write
        item = (HaWork.objects.unfinished().select_related("instance", "host")
                .filter(instance=vm, type=WorkType.HA).first())
        if item is None:
            return None
        try:
            work.finish(item, Step.CANCELLED, now=now,
                        message=f"HA work #{item.pk} for VM {vm.name} cancelled: operator "
                                f"stop{who}")
            return item
        except work.LostItem:
            continue
    raise ActionError(f"VM {vm.name}: its HA work keeps changing; try again")


def stop_vm(vm, *, now, by=""):
    """R15a, operator intent wins: cancel the VM's unfinished HA item (whatever the VM's
    state), then queue a Stop work item unless the VM is already Stopped; a worker stops
    the VM. Returns the Stop item; for a VM already Stopped, the cancelled HA item, or
    None when there was nothing to do (no change, no event: not an error)."""
    from django.db import transaction

    from hadash.choices import FINAL_STEPS, WorkType
    from hadash.models import HaWork
    from vms.choices import VmState

    from . import work

    with transaction.atomic():
        cancelled = cancel_ha_work(vm, now=now, by=by)
        vm.refresh_from_db()
        if vm.state == VmState.STOPPED:
            return cancelled
        if vm.state in (VmState.DESTROYED, VmState.EXPUNGING):
            if cancelled is not None:
                return cancelled
            raise ActionError(f"VM {vm.name} is already {vm.state}")
        item = work.schedule_stop(vm, now=now, by=by)
        if item is None:
            if cancelled is None:
                raise ActionError(f"VM {vm.name} already has a stop in progress")
            item = (HaWork.objects.filter(instance=vm, type=WorkType.STOP)
                    .exclude(step__in=FINAL_STEPS).first()) or cancelled
    return item


def start_vm(vm, *, engine, by=""):
    """Start a Stopped VM on a placed host now (synchronous)."""
    from django.db import transaction

    from hadash import config
    from hadash.choices import FINAL_STEPS
    from hadash.models import HaWork
    from hosts.models import Host
    from hosts.transport import AgentError, Unreachable
    from vms import definitions, placement
    from vms.choices import PowerState, VmState

    cfg = config.snapshot()
    vm.refresh_from_db()
    if vm.state != VmState.STOPPED:
        raise ActionError(f"VM {vm.name} is {vm.state}, not Stopped")
    if HaWork.objects.filter(instance=vm).exclude(step__in=FINAL_STEPS).exists():
        raise ActionError(f"VM {vm.name} has unfinished HA work; let it finish first")
    now = engine.now()
    found = placement.candidates(vm, ha=False, ha_tag=cfg["ha.tag"], cluster=vm.cluster)
    if found:
        # R23 enforce: an HA VM that would push its cluster below the failover level
        # is not started (checked where placement would put it).
        from clusters import admission as r23

        admit(r23.refusal_for_vm(vm, host_id=found[0].pk, cfg=cfg))
    target = None
    for host in found:
        with transaction.atomic():
            locked = Host.objects.select_for_update().get(pk=host.pk)
            if placement.candidates(vm, ha=False, ha_tag=cfg["ha.tag"], cluster=vm.cluster,
                                    only=(locked.pk,)) and vm.transition(
                VmState.STARTING, now=now, event="StartRequested", host=locked, reason=by,
                power_state_update_time=now,
                message=f"VM {vm.name} starting on {locked.name}"
                        f"{' (by ' + by + ')' if by else ''}",
            ):
                target = locked
                break
    if target is None:
        why = placement.why_none(vm, ha=False, ha_tag=cfg["ha.tag"], cluster=vm.cluster)[1]
        raise ActionError(f"no host has room for VM {vm.name}: {why}")
    try:
        # PROTOCOL.md v1.1: the stored definition goes with the start (an agent
        # client written before v1.1 is called as before when there is none).
        definition = definitions.of_vm(vm)
        engine.agents.start_vm(target, vm, **({"definition": definition} if definition else {}))
    except (Unreachable, AgentError) as exc:
        vm.refresh_from_db()
        vm.transition(VmState.STOPPED, now=engine.now(), event="StartFailed", host=None,
                      last_host=target,
                      message=f"Starting VM {vm.name} on {target.name} failed: {exc}")
        raise ActionError(f"starting {vm.name} on {target.name} failed: {exc}") from None
    vm.refresh_from_db()
    vm.transition(VmState.RUNNING, now=engine.now(), event="Started",
                  power_state=PowerState.POWER_ON, power_host=target,
                  power_state_update_time=engine.now(), power_state_update_count=1,
                  message=f"VM {vm.name} Running on {target.name}")
    return vm


def set_vm_ha(vm, enabled: bool, *, now, by=""):
    """Turn a VM's HA on or off (SettingsChanged event). R23 enforce: making a VM
    HA-enabled that would push its cluster below the failover level is refused
    (AdmissionRefused) and nothing changes."""
    from hadash import config
    from hadash.api.serializers import apply_settings

    vm.refresh_from_db()
    if enabled and not vm.ha_enabled:
        from clusters import admission as r23

        admit(r23.refusal_for_vm(vm, ha_enabled=True, cfg=config.snapshot()))
    apply_settings(vm, {"ha_enabled": bool(enabled)}, by=by, now=now)
    return vm
