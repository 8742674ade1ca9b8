"""Virtual machines (CloudStack's `vm_instance` table)."""

from __future__ import annotations

import uuid as uuid_lib

from django.db import models, transaction

from hadash.choices import Subject
from hadash.events import record_event

from .choices import ACTIVE_STATES, GroupKind, PowerState, Priority, VmState, VmType


class VMInstanceManager(models.Manager):
    """Every query leaves the definition's XML out (up to 1 MiB a VM, issue 9): the
    engine, the ping path, lists and the dashboard never need it. Reading
    ``vm.definition_xml`` loads it on demand (one query), as `vms.definitions` does."""

    def get_queryset(self):
        return super().get_queryset().defer("definition_xml")


class VMInstance(models.Model):
    name = models.CharField(max_length=255, unique=True)
    uuid = models.UUIDField(default=uuid_lib.uuid4, unique=True, editable=False)
    type = models.CharField(max_length=32, choices=VmType.choices, default=VmType.USER)
    state = models.CharField(max_length=32, choices=VmState.choices, default=VmState.STOPPED)
    power_state = models.CharField(
        max_length=32, choices=PowerState.choices, default=PowerState.POWER_UNKNOWN
    )
    power_host = models.ForeignKey(
        "hosts.Host", null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
        db_column="power_host",
    )
    power_state_update_time = models.DateTimeField(null=True, blank=True)
    power_state_update_count = models.PositiveIntegerField(default=0)
    # No index of its own: vm_host_state_idx (host, state) serves lookups by host.
    host = models.ForeignKey(
        "hosts.Host", null=True, blank=True, on_delete=models.PROTECT, related_name="vms",
        db_index=False,
    )
    last_host = models.ForeignKey(
        "hosts.Host", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    ha_enabled = models.BooleanField(default=False)
    priority = models.CharField(max_length=8, choices=Priority.choices, default=Priority.MEDIUM)
    cpus = models.PositiveIntegerField(default=1)
    memory_mb = models.PositiveBigIntegerField(default=1024)
    # Bumped on every state change; HA work snapshots it (R12.1).
    update_count = models.PositiveBigIntegerField(default=0)
    created = models.DateTimeField(auto_now_add=True)
    # The VM's latest definition (PROTOCOL.md v1.1, issue 9): what its host's agent
    # reported (connect, or a ping entry when it changed) or an operator set (API).
    # `start` sends it, so another host can run the VM. `vms.definitions` validates
    # and writes it (format "libvirt-xml", at most MAX_DEFINITION_BYTES).
    definition_format = models.CharField(max_length=32, blank=True, default="")
    definition_xml = models.TextField(blank=True, default="")
    definition_time = models.DateTimeField(null=True, blank=True)
    definition_host = models.ForeignKey(
        "hosts.Host", null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
        help_text="The host whose agent reported the definition (empty: set by an operator).",
    )
    definition_by = models.CharField(max_length=150, blank=True, default="",
                                     help_text="The operator who set the definition.")

    objects = VMInstanceManager()

    class Meta:
        db_table = "vm_instance"
        verbose_name = "VM"
        ordering = ["name"]
        indexes = [
            models.Index(fields=["host", "state"], name="vm_host_state_idx"),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def has_definition(self) -> bool:
        return bool(self.definition_format)

    @property
    def is_system(self) -> bool:
        return self.type != VmType.USER

    @property
    def cluster(self) -> str | None:
        """A VM belongs to the cluster of the host it is on, or was last on."""
        host = self.host or self.last_host
        return host.cluster if host else None

    def occupies_capacity(self) -> bool:
        return self.state in ACTIVE_STATES

    def transition(
        self,
        to: str,
        *,
        now,
        event: str = "StateChanged",
        reason: str = "",
        message: str = "",
        alert: bool = False,
        incident=None,
        **fields,
    ) -> bool:
        """Move the VM to state ``to`` if nobody changed it since this instance was
        read (same state and update counter), writing the event in the same
        transaction. Returns False and changes nothing when the VM moved meanwhile.
        ``incident`` (a row or its id): the incident the event belongs to (R18).
        """
        with transaction.atomic(savepoint=False):
            changed = VMInstance.objects.filter(
                pk=self.pk, state=self.state, update_count=self.update_count
            ).update(state=to, update_count=models.F("update_count") + 1, **fields)
            if not changed:
                return False
            old = self.state
            if any(hasattr(v, "resolve_expression") for v in fields.values()):
                self.refresh_from_db()
            else:
                # What the UPDATE wrote, without reading the row back (issue 12: an HA
                # restart made three transitions, each a VM and a host SELECT). Nobody
                # changed the VM's state since it was read (the update counter matched).
                self.state, self.update_count = to, self.update_count + 1
                for name, value in fields.items():
                    setattr(self, name, value)
            where = f" on {self.host.name}" if self.host_id else ""
            record_event(
                Subject.VM,
                self,
                event=event,
                field="state",
                old=old,
                new=to,
                reason=reason,
                message=message or f"VM {self.name}: {old} → {to}{where}",
                alert=alert,
                now=now,
                incident=incident,
            )
        return True


class UnmanagedVm(models.Model):
    """A VM an agent reports that hadash does not manage (PROTOCOL.md v1.1, issue 9:
    discovery). Written by `vms.discovery` when a host's set of unknown names changes
    (or at most every REFRESH while it stays the same), removed when the host stops
    reporting it or the name becomes managed (adopted, registered). Nothing here is
    adopted automatically: an operator does that (API, dashboard)."""

    host = models.ForeignKey("hosts.Host", on_delete=models.CASCADE, related_name="+")
    name = models.CharField(max_length=255)
    power_state = models.CharField(max_length=32, choices=PowerState.choices)
    definition_format = models.CharField(max_length=32, blank=True, default="")
    definition_xml = models.TextField(blank=True, default="")
    first_seen = models.DateTimeField()
    last_seen = models.DateTimeField(db_index=True)

    class Meta:
        db_table = "vm_unmanaged"
        verbose_name = "unmanaged VM"
        ordering = ["name", "host"]
        constraints = [
            models.UniqueConstraint(fields=["host", "name"], name="vm_unmanaged_host_name"),
        ]

    def __str__(self) -> str:
        return f"{self.name} on {self.host_id}"

    @property
    def has_definition(self) -> bool:
        return bool(self.definition_format)


class VmGroup(models.Model):
    """A named group of VMs (R25): `anti-affinity` — strict, never two members on one
    host (HA restarts, maintenance migrations, operator starts and the failover plan
    honour it; a placement that cannot waits with its reason) — or `affinity` — soft,
    a member's host is preferred among the hosts that fit. ``cluster`` is informative
    (the cluster page lists the groups of its VMs; blank: any)."""

    name = models.CharField(max_length=255, unique=True)
    kind = models.CharField(max_length=16, choices=GroupKind.choices)
    members = models.ManyToManyField(VMInstance, related_name="vm_groups", blank=True)
    cluster = models.CharField(max_length=255, blank=True, default="")
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "vm_group"
        verbose_name = "VM group"
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.kind})"
