"""VM groups (R25): create, change and delete them, each change committed with its
event (subject config, name "vm-group NAME"). Used by the API (hadash.api.groups) and
the admin; placement reads them (vms.placement.group_rule, vms.failover).

A group's rule applies to placements from its creation on: nothing is moved because
a group is created over VMs that share a host — the next restart, migration or start
of a member honours it, and `conflicts` names what does not yet.
"""

from __future__ import annotations

import re

from django.db import IntegrityError, transaction

from hadash.choices import Subject
from hadash.events import record_event
from hadash.names import NAME_PATTERN, NAME_RULE

from .choices import ACTIVE_STATES, GroupKind
from .models import VmGroup, VMInstance

MAX_MEMBERS = 1000


class GroupError(ValueError):
    """A group change that cannot be made as asked; the message says why."""


def _members(names) -> list[VMInstance]:
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise GroupError("vms must be a list of VM names")
    if len(names) > MAX_MEMBERS:
        raise GroupError(f"a group has at most {MAX_MEMBERS} VMs")
    wanted = list(dict.fromkeys(names))
    found = {v.name: v for v in VMInstance.objects.filter(name__in=wanted)}
    unknown = [n for n in wanted if n not in found]
    if unknown:
        raise GroupError(f"no VM named {', '.join(repr(n) for n in unknown[:10])}")
    return [found[n] for n in wanted]


def _check(name=None, kind=None, cluster=None) -> None:
    if name is not None and (not isinstance(name, str)
                             or not re.fullmatch(NAME_PATTERN, name)):
        raise GroupError(f"name: {NAME_RULE}")
    if kind is not None and kind not in GroupKind.values:
        raise GroupError(f"kind must be one of {', '.join(GroupKind.values)}")
    if cluster is not None and (not isinstance(cluster, str) or len(cluster) > 255
                                or any(ord(ch) < 32 or 0xD800 <= ord(ch) <= 0xDFFF
                                       for ch in cluster)):
        raise GroupError("cluster must be a cluster name (at most 255 printable characters) "
                         "or empty")


def _event(group: VmGroup, *, event: str, message: str, now, by: str) -> None:
    record_event(Subject.CONFIG, group, name=f"vm-group {group.name}", event=event,
                 field="vm-group", reason=by, now=now,
                 message=f"{message}{' by ' + by if by else ''}")


def _words(group: VmGroup, members) -> str:
    names = ", ".join(v.name for v in members) or "no VMs"
    return f"VM group {group.name} ({group.kind}): {names}"


def create(*, name, kind, vms=(), cluster="", now, by="") -> VmGroup:
    _check(name, kind, cluster)
    members = _members(list(vms))
    try:
        with transaction.atomic():
            group = VmGroup.objects.create(name=name, kind=kind, cluster=cluster or "")
            group.members.set(members)
            _event(group, event="GroupCreated", message=f"{_words(group, members)} created",
                   now=now, by=by)
    except IntegrityError:
        raise GroupError(f"a VM group named {name!r} already exists") from None
    return group


def update(group: VmGroup, *, kind=None, vms=None, cluster=None, now, by="") -> VmGroup:
    """Change the kind, the members (the whole list) or the cluster; one event."""
    _check(None, kind, cluster)
    members = _members(list(vms)) if vms is not None else None
    with transaction.atomic():
        fields = {}
        if kind is not None and kind != group.kind:
            fields["kind"] = kind
        if cluster is not None and cluster != group.cluster:
            fields["cluster"] = cluster
        if fields:
            VmGroup.objects.filter(pk=group.pk).update(**fields)
            for k, v in fields.items():
                setattr(group, k, v)
        if members is not None:
            group.members.set(members)
        shown = members if members is not None else list(group.members.order_by("name"))
        _event(group, event="GroupChanged", message=f"{_words(group, shown)} changed",
               now=now, by=by)
    return group


def delete(group: VmGroup, *, now, by="") -> None:
    with transaction.atomic():
        _event(group, event="GroupDeleted", message=f"VM group {group.name} deleted",
               now=now, by=by)
        group.delete()


def record_saved(group: VmGroup, *, created: bool, now, by="") -> None:
    """The event of a group saved elsewhere (the admin), in its transaction."""
    members = list(group.members.order_by("name"))
    _event(group, event="GroupCreated" if created else "GroupChanged",
           message=f"{_words(group, members)} {'created' if created else 'changed'}",
           now=now, by=by)


def conflicts(group: VmGroup) -> list[str]:
    """Hosts on which an anti-affinity group has two or more members now (from before
    the group said so): "kvm-03: db1, db2"."""
    if group.kind != GroupKind.ANTI_AFFINITY:
        return []
    by_host: dict[str, list[str]] = {}
    for name, host in group.members.filter(state__in=ACTIVE_STATES, host__isnull=False) \
            .values_list("name", "host__name"):
        by_host.setdefault(host, []).append(name)
    return [f"{h}: {', '.join(sorted(v))}" for h, v in sorted(by_host.items()) if len(v) > 1]
