"""Hypervisor hosts (CloudStack's `host` table)."""

from __future__ import annotations

import hashlib
import hmac
import uuid as uuid_lib

from django.conf import settings
from django.db import models, transaction
from django.db.models import Q

from hadash.choices import Subject
from hadash.events import record_event

from .choices import (
    SWEPT_STATUSES,
    HostEvent,
    HostStatus,
    HostType,
    ResourceState,
)


class Host(models.Model):
    name = models.CharField(max_length=255, unique=True)
    uuid = models.UUIDField(default=uuid_lib.uuid4, unique=True, editable=False)
    type = models.CharField(max_length=32, choices=HostType.choices, default=HostType.ROUTING)
    hypervisor_type = models.CharField(max_length=32, default="KVM")
    cluster = models.CharField(max_length=255, default="c1", db_index=True)
    status = models.CharField(
        max_length=32, choices=HostStatus.choices, default=HostStatus.CREATING
    )
    resource_state = models.CharField(
        max_length=32, choices=ResourceState.choices, default=ResourceState.ENABLED
    )
    last_ping = models.DateTimeField(null=True, blank=True)
    cpus = models.PositiveIntegerField(default=0)
    memory_mb = models.PositiveBigIntegerField(default=0)
    tags = models.CharField(
        max_length=1024, blank=True, default="", help_text="Host tags, comma-separated (ha.tag)."
    )
    private_ip_address = models.CharField(max_length=255, blank=True, default="")
    agent_url = models.CharField(max_length=1024, blank=True, default="")
    # Per-host agent token (PROTOCOL.md): only a hash is stored. The raw token is an
    # HMAC of SECRET_KEY over (uuid, token_generation), so the server can present it
    # on server→agent calls without ever storing it.
    token_hash = models.CharField(max_length=64, blank=True, default="", db_index=True)
    token_generation = models.PositiveIntegerField(default=0)
    # Out-of-band management (Redfish), set by an operator, never by the agent.
    oobm_enabled = models.BooleanField("OOB management enabled", default=False)
    oobm_address = models.CharField(
        "BMC address", max_length=1024, blank=True, default="",
        help_text="Redfish service root, e.g. https://10.0.1.11",
    )
    oobm_system_id = models.CharField("Redfish system id", max_length=255, blank=True, default="")
    oobm_username = models.CharField(max_length=255, blank=True, default="")
    oobm_password = models.CharField(max_length=255, blank=True, default="")
    # R5: when an undeterminable or Alert host is next investigated.
    next_investigation = models.DateTimeField(null=True, blank=True)
    update_count = models.PositiveBigIntegerField(default=0)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "host"
        ordering = ["name"]
        indexes = [
            # R2: the monitor sweep's query — watched hosts by last ping.
            models.Index(
                fields=["last_ping"],
                name="host_sweep_idx",
                condition=Q(status__in=[*SWEPT_STATUSES, HostStatus.ALERT]),
            ),
            models.Index(fields=["cluster", "status"], name="host_cluster_status_idx"),
        ]

    def __str__(self) -> str:
        return self.name

    # --- tags -----------------------------------------------------------------
    @property
    def tag_list(self) -> list[str]:
        return [t.strip() for t in self.tags.split(",") if t.strip()]

    def has_tag(self, tag: str) -> bool:
        return tag in self.tag_list

    # --- agent token ----------------------------------------------------------
    def agent_token(self) -> str:
        """The raw per-host token for the current generation (never stored)."""
        msg = f"{self.uuid}:{self.token_generation}".encode()
        return hmac.new(settings.SECRET_KEY.encode(), msg, hashlib.sha256).hexdigest()

    @staticmethod
    def hash_token(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    def token_matches(self, token: str) -> bool:
        return bool(self.token_hash) and hmac.compare_digest(
            self.token_hash, self.hash_token(token)
        )

    # --- transitions ----------------------------------------------------------
    def transition(
        self,
        to: str,
        *,
        now,
        event: str,
        reason: str = "",
        message: str = "",
        alert: bool = False,
        expect: tuple[str, ...] | None = None,
        **fields,
    ) -> bool:
        """Move the host to status ``to`` if it is still in ``expect`` (default: the
        status this instance holds), writing the event in the same transaction.

        A conditional UPDATE, so two processes racing on the same host never both
        win; returns False (and changes nothing) when the host moved meanwhile.
        """
        expect = expect or (self.status,)
        with transaction.atomic():
            changed = Host.objects.filter(pk=self.pk, status__in=expect).update(
                status=to, update_count=models.F("update_count") + 1, **fields
            )
            if not changed:
                return False
            old = self.status
            self.refresh_from_db()
            record_event(
                Subject.HOST,
                self,
                event=event,
                field="status",
                old=old,
                new=to,
                reason=reason,
                message=message or f"Host {self.name}: {old} → {to}",
                alert=alert,
                now=now,
            )
        return True

    def set_resource_state(
        self, to: str, *, now, reason: str = "", message: str = "", alert: bool = False,
        expect: tuple[str, ...] | None = None,
    ) -> bool:
        expect = expect or (self.resource_state,)
        with transaction.atomic():
            changed = Host.objects.filter(pk=self.pk, resource_state__in=expect).update(
                resource_state=to, update_count=models.F("update_count") + 1
            )
            if not changed:
                return False
            old = self.resource_state
            self.refresh_from_db()
            record_event(
                Subject.HOST,
                self,
                event=HostEvent.RESOURCE_STATE,
                field="resource_state",
                old=old,
                new=to,
                reason=reason,
                message=message or f"Host {self.name}: resource state {old} → {to}",
                alert=alert,
                now=now,
            )
        return True
