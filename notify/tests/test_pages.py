"""R20 on the dashboard and in the admin: the Notifications page lists channels with
their last delivery and the recent deliveries (state, attempts, last error); admins
"Send test" from it; channels are created in the admin (checked, secret never shown
back) and the admin's "Send test notification" action queues a test delivery."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from hadash.models import Event
from notify import outbox
from notify.models import Channel, Delivery, DeliveryState

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client):
    client.force_login(get_user_model().objects.create_user("boss", is_staff=True,
                                                            is_superuser=True))
    return client


@pytest.fixture
def reader_client(client):
    client.force_login(get_user_model().objects.create_user("viewer"))
    return client


def hook(**kw):
    fields = dict(name="ops-hook", kind="webhook", url="https://hooks.example.com/T0/secretpath",
                  secret="topsecret")
    fields.update(kw)
    return Channel.objects.create(**fields)


def test_r20_page_shows_channels_last_delivery_and_errors(reader_client):
    ch = hook()
    outbox.enqueue_test(ch, now=timezone.now())
    d = outbox.enqueue_test(ch, now=timezone.now())
    Delivery.objects.filter(pk=d.pk).update(state=DeliveryState.PENDING, attempts=3,
                                            last_error="HTTP 502: bad gateway")
    r = reader_client.get("/notifications")
    assert r.status_code == 200
    html = r.content.decode()
    assert 'id="nav-notifications"' in html
    assert 'data-channel="ops-hook" data-last-state="pending"' in html
    assert "https://hooks.example.com/…" in html
    assert "secretpath" not in html and "topsecret" not in html
    assert "HTTP 502: bad gateway" in html and "retrying" in html
    assert f'id="delivery-{d.pk}" data-state="pending"' in html
    assert "Send test" not in html, "read-only users get no test button"
    r = reader_client.get("/notifications?state=failed")
    assert 'id="deliveries-empty"' in r.content.decode()


def test_r20_admin_sends_a_test_from_the_page(admin_client):
    ch = hook(enabled=False)
    r = admin_client.get("/notifications")
    assert f'id="test-{ch.pk}"' in r.content.decode()
    r = admin_client.post(f"/notifications/channels/{ch.pk}/test", follow=True)
    assert r.status_code == 200
    d = Delivery.objects.get()
    assert (d.transition, d.state, d.channel) == ("test", "pending", ch)
    assert f"Test delivery #{d.pk} queued" in r.content.decode()
    assert admin_client.post("/notifications/channels/999999/test").status_code == 404


def test_r20_read_only_user_cannot_send_test(client):
    ch = hook()
    client.force_login(get_user_model().objects.create_user("viewer"))
    assert client.post(f"/notifications/channels/{ch.pk}/test").status_code == 403
    assert not Delivery.objects.exists()


def test_r20_admin_creates_channel_checked_and_secret_never_shown(admin_client):
    form = {"name": "mail-oncall", "kind": "email", "url": "", "enabled": "on",
            "min_severity": "critical", "recipients_text": "a@example.com, b@example.com",
            "kinds_text": "", "clusters_text": "c1", "new_secret": ""}
    r = admin_client.post("/admin/notify/channel/add/", {**form, "recipients_text": "nope"})
    assert r.status_code == 200 and "is not an e-mail address" in r.content.decode()
    assert not Channel.objects.exists()
    r = admin_client.post("/admin/notify/channel/add/", form)
    assert r.status_code == 302, r.content.decode()[:2000]
    ch = Channel.objects.get()
    assert ch.recipients == ["a@example.com", "b@example.com"] and ch.clusters == ["c1"]
    assert Event.objects.filter(event="ChannelCreated").exists()

    wh = {"name": "hook", "kind": "webhook", "url": "https://u:p@example.com/x",
          "enabled": "on", "min_severity": "warning", "new_secret": "hush"}
    r = admin_client.post("/admin/notify/channel/add/", wh)
    assert "user or password" in r.content.decode()
    r = admin_client.post("/admin/notify/channel/add/", {**wh, "url": "https://example.com/x"})
    assert r.status_code == 302
    hook_ch = Channel.objects.get(name="hook")
    assert hook_ch.secret == "hush"
    page = admin_client.get(f"/admin/notify/channel/{hook_ch.pk}/change/").content.decode()
    assert "hush" not in page and "A secret is set" in page
    # Saving without a new secret keeps it.
    r = admin_client.post(f"/admin/notify/channel/{hook_ch.pk}/change/",
                          {**wh, "url": "https://example.com/y", "new_secret": ""})
    assert r.status_code == 302
    hook_ch.refresh_from_db()
    assert (hook_ch.secret, hook_ch.url) == ("hush", "https://example.com/y")


def test_r20_admin_action_send_test(admin_client):
    ch = hook()
    r = admin_client.post("/admin/notify/channel/", {
        "action": "send_test", "_selected_action": [ch.pk]}, follow=True)
    assert r.status_code == 200
    assert Delivery.objects.filter(channel=ch, transition="test").count() == 1
    assert "queued for ops-hook" in r.content.decode()


def test_r20_page_links_an_incident_delivery_to_its_incident(reader_client):
    from django.db import transaction

    from hadash.alerts import open_alert
    from hadash.models import Incident

    hook(min_severity="info")
    now = timezone.now()
    inc = Incident.objects.create(kind="host", host_name="kvm-07", title="kvm-07 down",
                                  detected_at=now, updated=now)
    with transaction.atomic():
        open_alert("HostDown", "host", "kvm-07", now=now, incident=inc,
                   title="kvm-07 stopped answering", severity="critical")
    html = reader_client.get("/notifications").content.decode()
    assert f'<a href="/incidents/{inc.pk}">kvm-07 stopped answering</a>' in html


def test_r20_admin_retry_now_makes_a_failed_delivery_due_with_an_event(admin_client):
    ch = hook()
    d = outbox.enqueue_test(ch, now=timezone.now())
    Delivery.objects.filter(pk=d.pk).update(state=DeliveryState.FAILED, attempts=10,
                                            last_error="HTTP 500")
    r = admin_client.post("/admin/notify/delivery/", {
        "action": "retry_now", "_selected_action": [d.pk]}, follow=True)
    assert r.status_code == 200 and "1 delivery due again now" in r.content.decode()
    d.refresh_from_db()
    assert (d.state, d.attempts) == (DeliveryState.PENDING, 0)
    assert Event.objects.filter(event="NotificationRetry", subject_name="ops-hook").exists()
