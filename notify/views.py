"""Dashboard page for notifications (R20): the channels with their last delivery, the
recent deliveries (state, attempts, next attempt, last error), and "Send test".
Channels are created and edited in the admin (linked from here)."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, redirect
from django.utils import timezone
from django.views.decorators.http import require_POST

from dashboard.perms import admin_required
from dashboard.views import page

from . import outbox
from .api import last_deliveries
from .models import Channel, Delivery, DeliveryState

DELIVERIES_SHOWN = 100
BADGE = {DeliveryState.SENT: "st-Up", DeliveryState.FAILED: "st-Down",
         DeliveryState.SENDING: "step-Fencing", DeliveryState.PENDING: "st-Alert"}


@login_required
def notifications_page(request):
    state = request.GET.get("state", "")
    if state not in DeliveryState.values:
        state = ""
    chans = list(Channel.objects.order_by("name"))
    last = last_deliveries([c.pk for c in chans])
    for c in chans:
        c.last = last.get(c.pk)
        c.badge = BADGE.get(c.last.state, "") if c.last else ""
    qs = Delivery.objects.select_related("channel", "alert").order_by("-id")
    if state:
        qs = qs.filter(state=state)
    rows = list(qs[:DELIVERIES_SHOWN])
    for d in rows:
        d.badge = BADGE.get(d.state, "")
        d.waiting = d.state == DeliveryState.PENDING and d.attempts > 0
    counts = {s: Delivery.objects.filter(state=s).count() for s in
              (DeliveryState.PENDING, DeliveryState.FAILED)}
    return page(request, "dashboard/notifications.html", "notifications", {
        "channels": chans, "deliveries": rows, "state": state,
        "states": DeliveryState.values, "counts": counts, "shown": DELIVERIES_SHOWN,
        "can_edit": request.user.is_staff,
    })


@require_POST
@admin_required
def channel_test(request, pk: int):
    """Queue a test delivery to the channel; the engine sends it (R20 "send test")."""
    channel = get_object_or_404(Channel, pk=pk)
    d = outbox.enqueue_test(channel, now=timezone.now(), by=request.user.get_username())
    messages.success(request, f"Test delivery #{d.pk} queued for {channel.name}; the engine "
                     "sends it within seconds: reload to see its state.")
    return redirect("dash:notifications")
