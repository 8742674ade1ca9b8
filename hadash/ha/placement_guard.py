"""Placement with a reservation (R13): the chosen host's row is locked and its free
capacity re-checked in the transaction that moves the VM to Starting there, so two
workers never fill the same room twice."""

from __future__ import annotations

from django.db import transaction

from hadash.choices import Step
from hosts.models import Host
from vms import placement
from vms.choices import VmState

from .work import mark_vm, set_step


def pick(vm, *, ha: bool, cfg, exclude=()):
    return placement.pick_host(
        vm, ha=ha, ha_tag=cfg["ha.tag"], cluster=vm.cluster, exclude=tuple(exclude)
    )


def reserve(vm, item, *, ha: bool, now, cfg):
    """Pick a host and move the VM to Starting on it and the item to Restarting, in
    one transaction. Returns the host, or None when no host has room."""
    for host in placement.candidates(vm, ha=ha, ha_tag=cfg["ha.tag"], cluster=vm.cluster):
        with transaction.atomic():
            locked = Host.objects.select_for_update().get(pk=host.pk)
            if not placement.candidates(vm, ha=ha, ha_tag=cfg["ha.tag"], cluster=vm.cluster,
                                        only=(locked.pk,)):
                continue  # filled meanwhile; try the next
            if not mark_vm(vm, item, VmState.STARTING, now=now, event="HaStarting",
                           message=f"VM {vm.name} starting on {locked.name} (HA)",
                           host=locked, power_state_update_time=now):
                return None
            set_step(item, Step.RESTARTING, now=now, target_host=locked,
                     message=f"HA work #{item.pk}: starting VM {vm.name} on {locked.name}")
            return locked
    return None
