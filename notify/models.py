"""Notification channels and their deliveries (SPEC R20).

A ``Delivery`` is one message for one channel, written by ``notify.outbox.enqueue`` in
the transaction of the alert change that causes it and sent later, outside any
transaction, by ``notify.sender`` in every engine process: claimed by a conditional
UPDATE (a lease), retried with back-off, and carrying an idempotency key so a receiver
can drop the duplicate a crash mid-send may cause.
"""

from __future__ import annotations

from django.db import models
from django.db.models import Q

from hadash.choices import Severity, Transition


class ChannelKind(models.TextChoices):
    WEBHOOK = "webhook"  # generic JSON, optionally HMAC-signed
    ALERTMANAGER = "alertmanager"  # Alertmanager's webhook v4 body
    EMAIL = "email"  # SMTP, settings from the environment


class DeliveryState(models.TextChoices):
    PENDING = "pending"  # due at next_attempt
    SENDING = "sending"  # claimed by taken_by at taken_at (a lease)
    SENT = "sent"
    FAILED = "failed"  # gave up after MAX_ATTEMPTS


class Channel(models.Model):
    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=16, choices=ChannelKind.choices)
    # webhook / alertmanager: where to POST (http or https, no user:password).
    url = models.CharField(max_length=2000, blank=True)
    # email: addresses (a list of strings).
    recipients = models.JSONField(default=list, blank=True)
    # HMAC-SHA256 key for X-Hadash-Signature (webhooks); never shown back.
    secret = models.CharField(max_length=255, blank=True)
    enabled = models.BooleanField(default=True)
    # Filter: alerts at least this severe, of these kinds and clusters (empty: all).
    min_severity = models.CharField(max_length=16, choices=Severity.choices,
                                    default=Severity.WARNING)
    kinds = models.JSONField(default=list, blank=True)
    clusters = models.JSONField(default=list, blank=True)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "notify_channel"
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def target(self) -> str:
        """Where it sends, safe to show anyone: the URL's scheme and host (a webhook
        URL's path often is a secret itself), or the e-mail addresses."""
        if self.kind == ChannelKind.EMAIL:
            return ", ".join(self.recipients)
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        rest = "/…" if (parts.path.strip("/") or parts.query) else ""
        return f"{parts.scheme}://{parts.netloc}{rest}"


class Delivery(models.Model):
    channel = models.ForeignKey(Channel, on_delete=models.CASCADE, related_name="deliveries")
    alert = models.ForeignKey("hadash.Alert", null=True, blank=True,
                              on_delete=models.SET_NULL, related_name="deliveries")
    transition = models.CharField(max_length=16, choices=Transition.choices)
    # What is sent, fixed when the change commits (the alert as it was then).
    payload = models.JSONField()
    idempotency_key = models.CharField(max_length=100, unique=True)
    state = models.CharField(max_length=16, choices=DeliveryState.choices,
                             default=DeliveryState.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt = models.DateTimeField()
    last_error = models.CharField(max_length=500, blank=True)
    created = models.DateTimeField()
    sent_at = models.DateTimeField(null=True, blank=True)
    # The lease: which sender (engine loop) holds it since when.
    taken_by = models.CharField(max_length=100, blank=True)
    taken_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "notify_delivery"
        ordering = ["-id"]
        verbose_name_plural = "deliveries"
        indexes = [
            # The sender's poll: due pending deliveries (and expired leases).
            models.Index(fields=["next_attempt"], name="delivery_due_idx",
                         condition=Q(state__in=["pending", "sending"])),
            models.Index(fields=["channel", "-id"], name="delivery_channel_idx"),
        ]

    def __str__(self) -> str:
        return f"Delivery #{self.pk} {self.transition} → {self.channel_id} ({self.state})"
