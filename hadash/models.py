"""The HA manager's own tables: configuration, events, HA work, leases, brakes,
operator API tokens."""

from __future__ import annotations

import hashlib
import secrets

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q

from . import config
from .choices import FINAL_STEPS, Reason, Severity, Step, Subject, WorkType


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
    created = models.DateTimeField()
    updated = models.DateTimeField()

    objects = HaWorkQuerySet.as_manager()

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


def _host_engine_loop(sender, proc_name=None, **kwargs):
    """Every engine process (`manage.py qcluster`) runs one engine loop of its own,
    started in one of its worker processes as django-q spawns it (hadash.ha.runtime).
    Connected here because this module is imported wherever Django is set up, so
    every process qcluster forks has the receiver."""
    from hadash.ha.runtime import host_resident_loop

    host_resident_loop()


def _connect_engine_loop() -> None:
    from django_q.signals import post_spawn

    post_spawn.connect(_host_engine_loop, dispatch_uid="hadash.engine_loop")


_connect_engine_loop()
