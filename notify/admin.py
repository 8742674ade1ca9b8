"""Admin for notifications (R20): channels are created and edited here (checked as in
the API, with their events); "Send test" queues a test delivery; deliveries are
read-only, with "Retry now" for failed or waiting ones."""

from __future__ import annotations

import re

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from . import channels, outbox
from .models import Channel, Delivery, DeliveryState


def _split(value: str) -> list[str]:
    return [v for v in re.split(r"[\s,;]+", value or "") if v]


class ChannelForm(forms.ModelForm):
    recipients_text = forms.CharField(
        label="Recipients", required=False, widget=forms.Textarea(attrs={"rows": 2}),
        help_text="E-mail channels: addresses, separated by commas or spaces.")
    kinds_text = forms.CharField(
        label="Alert kinds", required=False,
        help_text="Only alerts of these kinds (comma-separated); empty: all.")
    clusters_text = forms.CharField(
        label="Clusters", required=False,
        help_text="Only alerts of these clusters (comma-separated); empty: all.")
    new_secret = forms.CharField(
        label="Secret", required=False, max_length=255,
        widget=forms.PasswordInput(render_value=False),
        help_text="Webhooks: the key of the X-Hadash-Signature HMAC-SHA256 header. Never "
        "shown again; leave empty to keep the current one.")
    clear_secret = forms.BooleanField(label="Remove the secret", required=False)

    class Meta:
        model = Channel
        fields = ["name", "kind", "url", "enabled", "min_severity"]
        help_texts = {"url": "Webhook and Alertmanager channels: the http(s) URL to POST "
                             "to (no user:password in it)."}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        inst = self.instance
        self.fields["recipients_text"].initial = ", ".join(inst.recipients or [])
        self.fields["kinds_text"].initial = ", ".join(inst.kinds or [])
        self.fields["clusters_text"].initial = ", ".join(inst.clusters or [])
        if inst.secret:
            self.fields["new_secret"].help_text += " (A secret is set.)"
        from hadash.models import Alert

        seen = sorted(set(Alert.objects.values_list("kind", flat=True).distinct()[:50]))
        if seen:
            self.fields["kinds_text"].help_text += " Kinds seen so far: " + ", ".join(seen)

    def clean(self):
        data = super().clean()
        inst = self.instance
        inst.recipients = _split(data.get("recipients_text", ""))
        inst.kinds = _split(data.get("kinds_text", ""))
        inst.clusters = _split(data.get("clusters_text", ""))
        self.secret_changed = bool(data.get("new_secret") or data.get("clear_secret"))
        if data.get("clear_secret"):
            inst.secret = ""
        elif data.get("new_secret"):
            inst.secret = data["new_secret"]
        for f in ("name", "kind", "url", "enabled", "min_severity"):
            if f in data:
                setattr(inst, f, data[f] if data[f] is not None else "")
        try:
            channels.clean(inst)
        except ValidationError as exc:
            errors = exc.message_dict
            mapped = {"recipients": "recipients_text", "kinds": "kinds_text",
                      "clusters": "clusters_text", "secret": "new_secret"}
            for field, msgs in errors.items():
                target = mapped.get(field, field)
                self.add_error(target if target in self.fields else None, msgs)
        return data


@admin.register(Channel)
class ChannelAdmin(admin.ModelAdmin):
    form = ChannelForm
    list_display = ["name", "kind", "target", "enabled", "min_severity", "filters",
                    "last_delivery"]
    list_filter = ["kind", "enabled"]
    search_fields = ["name"]
    actions = ["send_test"]
    fieldsets = [
        (None, {"fields": ["name", "kind", "enabled"]}),
        ("Where", {"fields": ["url", "recipients_text", "new_secret", "clear_secret"]}),
        ("Filter", {"fields": ["min_severity", "kinds_text", "clusters_text"]}),
    ]

    @admin.display(description="Filter")
    def filters(self, obj) -> str:
        parts = []
        if obj.kinds:
            parts.append("kinds: " + ", ".join(obj.kinds))
        if obj.clusters:
            parts.append("clusters: " + ", ".join(obj.clusters))
        return "; ".join(parts) or "all"

    @admin.display(description="Last delivery")
    def last_delivery(self, obj) -> str:
        d = obj.deliveries.order_by("-id").first()
        return f"#{d.pk} {d.transition}: {d.state}" if d else "—"

    def save_model(self, request, obj, form, change):
        channels.save(obj, by=request.user.get_username(), now=timezone.now(),
                      secret_changed=getattr(form, "secret_changed", False))

    def delete_model(self, request, obj):
        channels.delete(obj, by=request.user.get_username(), now=timezone.now())

    def delete_queryset(self, request, queryset):
        with transaction.atomic():
            for obj in queryset:
                self.delete_model(request, obj)

    @admin.action(description="Send test notification")
    def send_test(self, request, queryset):
        for ch in queryset:
            d = outbox.enqueue_test(ch, now=timezone.now(), by=request.user.get_username())
            self.message_user(request, f"Test delivery #{d.pk} queued for {ch.name}: see "
                              "its state on the Notifications page.", messages.SUCCESS)


@admin.register(Delivery)
class DeliveryAdmin(admin.ModelAdmin):
    list_display = ["id", "channel", "transition", "alert", "state", "attempts",
                    "next_attempt", "last_error", "created", "sent_at"]
    list_filter = ["state", "transition", "channel"]
    list_select_related = ["channel", "alert"]
    search_fields = ["idempotency_key", "last_error"]
    actions = ["retry_now"]
    readonly_fields = [f.name for f in Delivery._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    @admin.action(description="Retry now (failed or waiting deliveries)")
    def retry_now(self, request, queryset):
        from hadash.choices import Subject
        from hadash.events import record_event

        now = timezone.now()
        with transaction.atomic():
            rows = list(queryset.filter(
                state__in=[DeliveryState.FAILED, DeliveryState.PENDING]
            ).select_related("channel").select_for_update(of=("self",)))
            n = Delivery.objects.filter(pk__in=[d.pk for d in rows]).update(
                state=DeliveryState.PENDING, next_attempt=now, attempts=0)
            for channel in {d.channel for d in rows}:
                ids = [d.pk for d in rows if d.channel_id == channel.pk]
                record_event(Subject.CHANNEL, channel, event="NotificationRetry", now=now,
                             message=f"{len(ids)} notification(s) of channel {channel.name} "
                             f"due again now (by {request.user.get_username()}): "
                             + ", ".join(f"#{i}" for i in ids[:20]))
            transaction.on_commit(outbox.due.set)
        self.message_user(request, f"{n} deliver{'y' if n == 1 else 'ies'} due again now.")
