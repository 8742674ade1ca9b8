"""Hypervisor hosts (CloudStack's `host` table)."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import uuid as uuid_lib

from django.db import models, transaction
from django.db.models import Q

from hadash.choices import Severity, Subject
from hadash.events import record_event
from hadash.names import NAME_RULE, validate_name

from .choices import (
    SWEPT_STATUSES,
    HostEvent,
    HostStatus,
    HostType,
    ResourceState,
)

# R30: random credentials of 32 bytes; R29: how long an operator's re-enrolment lasts.
TOKEN_BYTES = 32
REENROL_WINDOW = dt.timedelta(hours=1)


def split_tags(tags: str) -> tuple[str, ...]:
    """A host's comma-separated tags column as its tags."""
    return tuple(t.strip() for t in tags.split(",") if t.strip()) if tags else ()


class Host(models.Model):
    name = models.CharField(max_length=255, unique=True, validators=[validate_name],
                            help_text=NAME_RULE)
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
    # Credentials (PROTOCOL.md v1.1, SPEC R29/R30). The agent's token is random and
    # shown once, in the `connect` answer; only its SHA-256 is stored. `server_token` is
    # the server's own credential on server→agent calls: random, stored as it is
    # (the server must present it), never shown to operators (API, admin, dashboard,
    # events).
    token_hash = models.CharField(max_length=64, blank=True, default="", db_index=True,
                                  editable=False)
    server_token = models.CharField(max_length=128, blank=True, default="", editable=False)
    # R29: until when one join-key connect may take this row (an operator re-enrolled it).
    reenrol_until = models.DateTimeField("re-enrolment allowed until", null=True, blank=True,
                                         editable=False)
    # Out-of-band management (Redfish), set by an operator, never by the agent.
    oobm_enabled = models.BooleanField("OOB management enabled", default=False)
    oobm_address = models.CharField(
        "BMC address", max_length=1024, blank=True, default="",
        help_text="Redfish service root, e.g. https://10.0.1.11",
    )
    oobm_system_id = models.CharField("Redfish system id", max_length=255, blank=True, default="")
    oobm_username = models.CharField(max_length=255, blank=True, default="")
    oobm_password = models.CharField(max_length=255, blank=True, default="")
    # Who serves the host (PROTOCOL.md v1.1 connect's optional `agent` block, issue 9):
    # e.g. "hadash-agent" or "hadash-simulator", its version and hypervisor URI.
    agent_name = models.CharField(max_length=64, blank=True, default="")
    agent_version = models.CharField(max_length=64, blank=True, default="")
    agent_hypervisor_uri = models.CharField("hypervisor URI", max_length=255, blank=True,
                                            default="")
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
        return list(split_tags(self.tags))

    def has_tag(self, tag: str) -> bool:
        return tag in self.tag_list

    # --- agent identity (issue 9) ------------------------------------------------
    @property
    def agent_kind(self) -> str:
        """"agent" (a real hadash-agent), "simulator" (the fleet simulator), "other"
        (an agent that named itself otherwise) or "" (it sent no `agent` block)."""
        name = self.agent_name
        if not name:
            return ""
        if name == "hadash-agent":
            return "agent"
        if name == "hadash-simulator":
            return "simulator"
        return "other"

    @property
    def agent_label(self) -> str:
        """One line for operators: who serves the host."""
        if not self.agent_name:
            return "unknown agent (no identity sent)"
        parts = [self.agent_name]
        if self.agent_version:
            parts.append(self.agent_version)
        if self.agent_hypervisor_uri:
            parts.append(f"on {self.agent_hypervisor_uri}")
        return " ".join(parts)

    # --- credentials (R30) -------------------------------------------------------
    @staticmethod
    def new_secret() -> str:
        """A fresh random credential: 32 bytes (256 bits) from the OS, URL-safe text."""
        return secrets.token_urlsafe(TOKEN_BYTES)

    @staticmethod
    def hash_token(token: str) -> str:
        # A plain SHA-256 is enough for a 256-bit random token (nothing to guess), and
        # it keeps the per-ping lookup one indexed equality.
        return hashlib.sha256(token.encode()).hexdigest()

    def token_matches(self, token: str) -> bool:
        return bool(self.token_hash) and hmac.compare_digest(
            self.token_hash, self.hash_token(token)
        )

    def issue_credentials(self) -> tuple[str, str]:
        """New random agent token and server token on this instance (not saved):
        returns (token, server_token); only the token's hash is kept."""
        token = self.new_secret()
        self.token_hash = self.hash_token(token)
        self.server_token = self.new_secret()
        return token, self.server_token

    def reenrol_open(self, now) -> bool:
        return self.reenrol_until is not None and now < self.reenrol_until

    def allow_reenrol(self, *, now, by: str = "") -> dt.datetime:
        """R29: an operator re-enrols the host: for REENROL_WINDOW, one `connect` with
        the join key may take this row (new token and server token). The agent's
        current token keeps working until then. Recorded as `ReEnrolAllowed` in the
        same transaction. Returns the end of the window."""
        until = now + REENROL_WINDOW
        who = f" by {by}" if by else ""
        with transaction.atomic():
            Host.objects.filter(pk=self.pk).update(
                reenrol_until=until, update_count=models.F("update_count") + 1
            )
            self.reenrol_until = until
            record_event(
                Subject.HOST,
                self,
                event=HostEvent.REENROL_ALLOWED,
                field="reenrol_until",
                new=until.isoformat(timespec="seconds"),
                reason=by,
                severity=Severity.WARNING,
                message=(
                    f"Host {self.name}: re-enrolment allowed{who} — one agent connect "
                    f"with the join key may take this host until "
                    f"{until.isoformat(timespec='seconds')}"
                ),
                now=now,
            )
        return until

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
