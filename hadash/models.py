"""The HA manager's own tables: configuration, events, HA work, leases, brakes,
operator API tokens."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, models, transaction
from django.db.models import Q

from . import config
from .choices import (
    FINAL_STEPS,
    OPEN_INCIDENT_STATES,
    AlertState,
    IncidentKind,
    IncidentState,
    Reason,
    Severity,
    Step,
    Subject,
    VmOutcome,
    WaitCause,
    WorkType,
)


class Configuration(models.Model):
    """CloudStack's `configuration` table: one row per SPEC §2 key."""

    name = models.CharField(max_length=255, primary_key=True)
    value = models.CharField(max_length=4096, blank=True)
    default_value = models.CharField("default", max_length=4096, blank=True, db_column="default")
    category = models.CharField(max_length=64, blank=True)
    description = models.TextField(blank=True)
    updated = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "configuration"
        ordering = ["category", "name"]

    def __str__(self) -> str:
        return f"{self.name}={self.value}"

    @property
    def key(self) -> config.Key:
        return config.key(self.name)

    @property
    def type(self) -> str:
        return self.key.type

    def clean(self) -> None:
        try:
            k = config.key(self.name)
        except config.ConfigError as exc:
            raise ValidationError({"name": str(exc)}) from None
        try:
            self.value = k.normalise(self.value)
        except config.ConfigError as exc:
            raise ValidationError({"value": str(exc)}) from None


class Event(models.Model):
    """One state change, written in the transaction of the change. Alerts are events
    with ``alert`` set, shown until acknowledged."""

    time = models.DateTimeField(db_index=True)
    subject = models.CharField(max_length=16, choices=Subject.choices)
    subject_id = models.BigIntegerField(null=True, blank=True)
    subject_name = models.CharField(max_length=255, blank=True)
    event = models.CharField(max_length=64)
    field = models.CharField(max_length=64, blank=True)
    old = models.CharField(max_length=255, blank=True)
    new = models.CharField(max_length=255, blank=True)
    reason = models.CharField(max_length=255, blank=True)
    message = models.TextField(blank=True)
    alert = models.BooleanField(default=False)
    severity = models.CharField(max_length=16, choices=Severity.choices, default=Severity.INFO)
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    acknowledged_by = models.CharField(max_length=150, blank=True)
    host = models.ForeignKey(
        "hosts.Host", null=True, blank=True, on_delete=models.SET_NULL, related_name="events",
        db_constraint=False,
    )
    vm = models.ForeignKey(
        "vms.VMInstance", null=True, blank=True, on_delete=models.SET_NULL,
        related_name="events", db_constraint=False,
    )
    # R18: the failure story this event belongs to.
    incident = models.ForeignKey(
        "Incident", null=True, blank=True, on_delete=models.SET_NULL, related_name="events",
        db_constraint=False,
    )

    class Meta:
        db_table = "event"
        ordering = ["id"]
        indexes = [
            models.Index(fields=["subject", "subject_id", "id"], name="event_subject_idx"),
            models.Index(
                fields=["id"], name="event_open_alert_idx",
                condition=Q(alert=True, acknowledged_at__isnull=True),
            ),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.event} {self.subject}:{self.subject_name}"


class HaWorkQuerySet(models.QuerySet):
    def unfinished(self):
        return self.exclude(step__in=FINAL_STEPS)


def ha_rank(vm) -> int:
    """R11 order: system VMs first, then high, medium, low priority."""
    from vms.choices import PRIORITY_RANK, SYSTEM_VM_TYPES

    if vm.type in SYSTEM_VM_TYPES:
        return 0
    return 1 + PRIORITY_RANK.get(vm.priority, 1)


class HaWorkManager(models.Manager.from_queryset(HaWorkQuerySet)):
    """Scheduling HA work (R10): inserting items, each with its event. These are
    model-level operations so that the domain (hosts/, vms/: a host found Down, a power
    report) schedules work without the engine (hadash.ha), which claims and
    processes it."""

    def schedule(self, vm, *, type: str, reason: str, step: str, now, host=None,
                 tried: int = 0, message: str = ""):
        """Insert one item with its event; None when the VM already has an unfinished
        item of that type (the database constraint decides, R10)."""
        from .events import record_event

        if self.unfinished().filter(instance=vm, type=type).exists():
            return None
        try:
            with transaction.atomic():
                item = self.create(
                    instance=vm, vm_type=vm.type, type=type, reason=reason, step=step,
                    host=host if host is not None else vm.host, state=vm.state,
                    update_count=vm.update_count, time_to_try=now, tried=tried,
                    rank=ha_rank(vm), created=now, updated=now,
                )
                record_event(
                    Subject.WORK, item, name=vm.name, event="WorkScheduled", field="step",
                    old="", new=step, reason=reason, now=now, related_vm=vm,
                    related_host=item.host,
                    message=message or f"{type} work #{item.pk} scheduled for VM {vm.name} "
                                       f"({reason})",
                )
                return item
        except IntegrityError:
            return None  # another process scheduled it first

    def schedule_restart(self, vm, *, investigate: bool, reason: str, now, cfg=None):
        """R10: one HA item for the VM (at most one unfinished, by the database).
        Within time.between.failures a new item inherits the previous item's tries."""
        cfg = cfg or config.snapshot()
        window = now - dt.timedelta(seconds=cfg["time.between.failures"])
        previous = (
            self.filter(instance=vm, type=WorkType.HA, created__gte=window)
            .order_by("-id").values_list("tried", flat=True).first()
        )
        return self.schedule(
            vm, type=WorkType.HA, reason=reason, now=now, tried=previous or 0,
            step=Step.INVESTIGATING if investigate else Step.SCHEDULED,
        )

    def vms_on_host(self, host) -> list:
        """The VMs R5 schedules when ``host`` is Down, in R10's order: system VMs
        first, then by priority, then by name."""
        from vms.choices import ACTIVE_STATES
        from vms.models import VMInstance

        return sorted(
            VMInstance.objects.select_related("host").filter(host=host,
                                                             state__in=ACTIVE_STATES),
            key=lambda v: (ha_rank(v), v.name),
        )

    def schedule_restart_for_vms_on_host(self, host, *, now, ha, cfg=None,
                                         vms=None) -> list:
        """R10/R5: every VM on the host (``vms``: vms_on_host, when the caller has
        them), system VMs first then by priority; one event naming the HA VMs
        (``ha(vm, cfg)``: the domain's rule, vms.powersync.ha_wanted, passed in so this
        model layer never imports the domain's modules). Runs inside the transaction
        that marks the host Down; hosts.liveness declares the host's incident with
        these VMs and items in it too (R18)."""
        from .events import record_event

        cfg = cfg or config.snapshot()
        vms = self.vms_on_host(host) if vms is None else vms
        items = self._schedule_restarts(vms, reason=Reason.HOST_DOWN, now=now, cfg=cfg)
        ha_names = [vm.name for vm in vms if ha(vm, cfg)]
        if vms:
            names = ", ".join(ha_names) if ha_names else "none"
            record_event(
                Subject.HOST, host, event="HaScheduled", reason=Reason.HOST_DOWN,
                severity=Severity.WARNING, now=now,
                message=f"Host {host.name} is down: {len(vms)} VM(s) scheduled; HA VMs to "
                        f"restart: {names}",
            )
        return items

    def _schedule_restarts(self, vms, *, reason: str, now, cfg) -> list:
        """``schedule_restart(vm, investigate=True)`` for each of ``vms``, in their order,
        as a few statements instead of six round trips a VM (issue 12: a failed host's
        ten VMs took sixty inside the transaction that declares it Down, and its HA
        work waits for that commit). Should another process schedule one of these VMs
        meanwhile, the database refuses the whole insert (R10) and they are scheduled
        one by one as before."""
        from .events import event_values

        if not vms:
            return []
        ids = [vm.pk for vm in vms]
        busy = set(self.unfinished().filter(instance_id__in=ids, type=WorkType.HA)
                   .values_list("instance_id", flat=True))
        window = now - dt.timedelta(seconds=cfg["time.between.failures"])
        previous: dict[int, int] = {}
        for vm_id, tried in (self.filter(instance_id__in=ids, type=WorkType.HA,
                                         created__gte=window)
                             .order_by("-id").values_list("instance_id", "tried")):
            previous.setdefault(vm_id, tried)  # the latest item's tries (R10)
        todo = [vm for vm in vms if vm.pk not in busy]
        step = Step.INVESTIGATING
        try:
            with transaction.atomic():
                items = self.bulk_create([
                    HaWork(instance=vm, vm_type=vm.type, type=WorkType.HA, reason=reason,
                           step=step, host=vm.host, state=vm.state,
                           update_count=vm.update_count, time_to_try=now,
                           tried=previous.get(vm.pk) or 0, rank=ha_rank(vm), created=now,
                           updated=now)
                    for vm in todo])
                Event.objects.bulk_create([
                    Event(**event_values(
                        Subject.WORK, item, name=vm.name, event="WorkScheduled",
                        field="step", old="", new=step, reason=reason, now=now,
                        related_vm=vm, related_host=item.host,
                        message=f"{WorkType.HA} work #{item.pk} scheduled for VM {vm.name} "
                                f"({reason})"))
                    for item, vm in zip(items, todo, strict=True)])
        except IntegrityError:
            return [item for vm in vms
                    if (item := self.schedule_restart(vm, investigate=True, reason=reason,
                                                      now=now, cfg=cfg))]
        return items

    def retry_starts_on(self, host, *, now) -> list:
        """``host`` was found Down: HA items waiting out the back-off of a start that
        failed there (R12.5) are tried again now, each with its event. The host is dead
        (R4: its VMs are dead, R12.2), so nothing of theirs can run there; they need not
        wait restart.retry.interval to be placed elsewhere. When a rack fails, a restart
        can be placed on a fellow host that is failing too but not yet late with its
        pings (hadash.ha.placement_guard.late_among); its start gets no answer (issue 12:
        3 of a rack's 1,000 VMs waited 600 s)."""
        from .events import event_values

        items = list(self.unfinished().select_related("instance").filter(
            type=WorkType.HA, step=Step.SCHEDULED, waiting=WaitCause.BACKOFF,
            target_host=host, taken__isnull=True, time_to_try__gt=now))
        if not items:
            return []
        self.filter(pk__in=[i.pk for i in items], taken__isnull=True).update(
            time_to_try=now, waiting="", updated=now)
        Event.objects.bulk_create([
            Event(**event_values(
                Subject.WORK, item, name=item.instance.name, event="WorkRetry",
                field="step", old=item.step, new=item.step, reason=item.reason, now=now,
                related_vm=item.instance, related_host=host, incident=item.incident_id,
                message=f"{item.type} work #{item.pk} for {item.instance.name}: its start "
                        f"on {host.name} failed and {host.name} is Down now; tried again "
                        "now, elsewhere (not after the back-off)"))
            for item in items])
        return items

    def schedule_force_stop(self, vm, host, *, now):
        """R6: a second copy of a VM reported by ``host`` while it lives elsewhere."""
        return self.schedule(
            vm, type=WorkType.FORCE_STOP, reason=Reason.HOST_DEGRADED, step=Step.SCHEDULED,
            now=now, host=host,
            message=f"VM {vm.name} reported running on {host.name} while it lives on "
                    f"{vm.host}: stopping the second copy",
        )


class HaWork(models.Model):
    """CloudStack's `op_ha_work`: both the history of HA actions and the work queue."""

    instance = models.ForeignKey(
        "vms.VMInstance", on_delete=models.CASCADE, related_name="ha_work"
    )
    vm_type = models.CharField(max_length=32)
    type = models.CharField(max_length=16, choices=WorkType.choices)
    reason = models.CharField(max_length=32, choices=Reason.choices)
    step = models.CharField(max_length=16, choices=Step.choices)
    # The host the VM was on when the item was scheduled (the failed host).
    host = models.ForeignKey(
        "hosts.Host", null=True, blank=True, on_delete=models.SET_NULL, related_name="ha_work"
    )
    # Where a start or migration is being attempted (R12.5, R15).
    target_host = models.ForeignKey(
        "hosts.Host", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Snapshot of the VM when scheduled; refreshed by the engine's own changes (R12.1).
    state = models.CharField("VM state", max_length=32)
    update_count = models.PositiveBigIntegerField("VM update counter")
    taken = models.DateTimeField(null=True, blank=True)
    taken_by = models.CharField(max_length=255, blank=True)
    time_to_try = models.DateTimeField()
    tried = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    # Sort key of the VM (R11): 0 system VMs, then 1 high, 2 medium, 3 low.
    rank = models.PositiveSmallIntegerField(default=2)
    # R18: the incident this item recovers from (None: operator work, maintenance).
    incident = models.ForeignKey(
        "Incident", null=True, blank=True, on_delete=models.SET_NULL, related_name="ha_work",
    )
    # R17: why a retried item waits (a WaitCause code; empty while not waiting).
    waiting = models.CharField(max_length=32, blank=True)
    # R24: why the target host was chosen ("kvm-07: most free after placement, …").
    placement = models.CharField(max_length=500, blank=True)
    created = models.DateTimeField()
    updated = models.DateTimeField()

    objects = HaWorkManager()

    class Meta:
        db_table = "op_ha_work"
        verbose_name = "HA work item"
        ordering = ["-id"]
        constraints = [
            # R10: at most one unfinished item of a type per VM — so at most one
            # unfinished HA item — enforced by the database.
            models.UniqueConstraint(
                fields=["instance", "type"],
                condition=~Q(step__in=FINAL_STEPS),
                name="op_ha_work_one_unfinished_per_vm",
            ),
        ]
        indexes = [
            # R11: the workers' query — due, unfinished items by rank and age.
            models.Index(
                fields=["time_to_try", "rank", "id"],
                name="op_ha_work_due_idx",
                condition=~Q(step__in=FINAL_STEPS),
            ),
            models.Index(fields=["instance", "-id"], name="op_ha_work_vm_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.type} #{self.pk} {self.instance.name if self.instance_id else ''}"

    @property
    def is_finished(self) -> bool:
        return self.step in FINAL_STEPS


class Lease(models.Model):
    """A named lease, held by one process at a time and renewed as a heartbeat
    (sweeper, worker slots, periodic jobs). A holder that stops renewing loses it."""

    name = models.CharField(max_length=128, primary_key=True)
    holder = models.CharField(max_length=255, blank=True)
    expires = models.DateTimeField(null=True, blank=True)
    last_run = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "op_lease"

    def __str__(self) -> str:
        return self.name


class EngineProcess(models.Model):
    """A live engine loop (hadash.ha.runtime): its heartbeat proves it alive."""

    id = models.CharField(max_length=255, primary_key=True)
    host = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    started = models.DateTimeField()
    heartbeat = models.DateTimeField()
    leaving = models.BooleanField(default=False)
    sweeper = models.BooleanField(default=False)
    workers = models.PositiveIntegerField(default=0)
    busy = models.PositiveIntegerField(default=0)

    class Meta:
        db_table = "op_engine_process"
        ordering = ["started"]

    def __str__(self) -> str:
        return self.id


class ClusterBrake(models.Model):
    """Mass-failure brake state of a cluster (R14), so engagement and release are
    each announced once."""

    cluster = models.CharField(max_length=255, primary_key=True)
    engaged = models.BooleanField(default=False)
    since = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "op_cluster_brake"


class ApiToken(models.Model):
    """Operator API bearer token; only its hash is stored."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    key_hash = models.CharField(max_length=64, unique=True)
    prefix = models.CharField(max_length=8)
    created = models.DateTimeField(auto_now_add=True)
    last_used = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "api_token"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user})"

    @staticmethod
    def hash(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    @classmethod
    def issue(cls, user) -> tuple[ApiToken, str]:
        key = "hd_" + secrets.token_urlsafe(32)
        token = cls.objects.create(user=user, key_hash=cls.hash(key), prefix=key[:8])
        return token, key


class Incident(models.Model):
    """R18: one failure story — a host found behind on ping, or a VM that powered off
    or went missing while Running. Opened, progressed and closed by the engine in the
    transactions of the changes it records (hadash.incidents)."""

    kind = models.CharField(max_length=8, choices=IncidentKind.choices)
    state = models.CharField(max_length=16, choices=IncidentState.choices,
                             default=IncidentState.OPEN)
    host = models.ForeignKey(
        "hosts.Host", null=True, blank=True, on_delete=models.SET_NULL,
        related_name="incidents", db_constraint=False,
    )
    host_name = models.CharField(max_length=255, blank=True)
    vm = models.ForeignKey(
        "vms.VMInstance", null=True, blank=True, on_delete=models.SET_NULL,
        related_name="incidents", db_constraint=False,
    )
    vm_name = models.CharField(max_length=255, blank=True)
    cluster = models.CharField(max_length=255, blank=True, db_index=True)
    title = models.CharField(max_length=255)
    # Last ping (host) / last power confirmation (VM): the failure began after this.
    started_at = models.DateTimeField(null=True, blank=True)
    detected_at = models.DateTimeField(db_index=True)
    declared_at = models.DateTimeField(null=True, blank=True)  # HostDown
    fenced_at = models.DateTimeField(null=True, blank=True)
    first_restart_at = models.DateTimeField(null=True, blank=True)
    last_restart_at = models.DateTimeField(null=True, blank=True)
    resolved_at = models.DateTimeField(null=True, blank=True)
    vms_affected = models.PositiveIntegerField(default=0)  # HA VMs to bring back
    vms_restarted = models.PositiveIntegerField(default=0)
    vms_failed = models.PositiveIntegerField(default=0)
    updated = models.DateTimeField()

    class Meta:
        db_table = "incident"
        ordering = ["-id"]
        constraints = [
            # One open story per host and per VM.
            models.UniqueConstraint(
                fields=["kind", "host"], condition=Q(kind="host", state__in=OPEN_INCIDENT_STATES),
                name="incident_one_open_per_host",
            ),
            models.UniqueConstraint(
                fields=["kind", "vm"], condition=Q(kind="vm", state__in=OPEN_INCIDENT_STATES),
                name="incident_one_open_per_vm",
            ),
        ]
        indexes = [
            models.Index(fields=["state", "id"], name="incident_state_idx"),
        ]

    def __str__(self) -> str:
        return f"Incident #{self.pk} {self.title}"

    @property
    def is_open(self) -> bool:
        return self.state in OPEN_INCIDENT_STATES


class IncidentVm(models.Model):
    """One VM of an incident: its downtime (R18: last confirmation → Running again)."""

    incident = models.ForeignKey(Incident, on_delete=models.CASCADE, related_name="vms")
    vm = models.ForeignKey(
        "vms.VMInstance", null=True, blank=True, on_delete=models.SET_NULL,
        related_name="+", db_constraint=False,
    )
    vm_name = models.CharField(max_length=255)
    ha = models.BooleanField(default=True)
    outcome = models.CharField(max_length=16, choices=VmOutcome.choices,
                               default=VmOutcome.PENDING)
    down_since = models.DateTimeField(null=True, blank=True)  # last confirmation
    running_at = models.DateTimeField(null=True, blank=True)  # Running again
    target_host_name = models.CharField(max_length=255, blank=True)
    detail = models.CharField(max_length=500, blank=True)

    class Meta:
        db_table = "incident_vm"
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["incident", "vm_name"], name="incident_vm_once"),
        ]

    @property
    def downtime(self) -> float | None:
        if self.down_since and self.running_at:
            return (self.running_at - self.down_since).total_seconds()
        return None


class Alert(models.Model):
    """R19: something that needs an operator. One per incident (``incident`` set,
    updated as it progresses) or one per (kind, subject) while open; each resolves
    itself when its condition clears and may be acknowledged meanwhile."""

    kind = models.CharField(max_length=64)
    subject = models.CharField(max_length=16, choices=Subject.choices)
    subject_name = models.CharField(max_length=255, blank=True)
    # "kind:subject:subject_name" (or "incident:<id>"): one open alert per key.
    key = models.CharField(max_length=400)
    incident = models.OneToOneField(
        Incident, null=True, blank=True, on_delete=models.SET_NULL, related_name="alert",
    )
    cluster = models.CharField(max_length=255, blank=True)
    severity = models.CharField(max_length=16, choices=Severity.choices,
                                default=Severity.WARNING)
    state = models.CharField(max_length=16, choices=AlertState.choices,
                             default=AlertState.OPEN)
    title = models.CharField(max_length=255)
    message = models.TextField(blank=True)
    count = models.PositiveIntegerField(default=1)
    opened_at = models.DateTimeField(db_index=True)
    updated_at = models.DateTimeField()
    resolved_at = models.DateTimeField(null=True, blank=True)
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    acknowledged_by = models.CharField(max_length=150, blank=True)

    class Meta:
        db_table = "alert"
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(fields=["key"], condition=Q(state="open"),
                                    name="alert_one_open_per_key"),
        ]
        indexes = [models.Index(fields=["state", "id"], name="alert_state_idx")]

    def __str__(self) -> str:
        return f"Alert #{self.pk} {self.title}"

    @property
    def is_open(self) -> bool:
        return self.state == AlertState.OPEN
