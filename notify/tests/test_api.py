"""R20 through the operator API: admins create, change and delete notification
channels (checked: webhook URLs http(s) without user:password — R31 — e-mail
addresses, filters), read-only users read (the secret is never shown, URLs only as
scheme://host/…), "send test" queues a test delivery the sender delivers, and
deliveries show their state, attempts and last error."""

from __future__ import annotations

import json

import pytest
from rest_framework.test import APIClient

from hadash.models import Event
from notify import sender
from notify.models import Channel, Delivery, DeliveryState
from notify.tests.receivers import Receiver

pytestmark = pytest.mark.django_db

API = "/api/v1"


HOOK = {"name": "ops-hook", "kind": "webhook",
        "url": "https://hooks.example.com/services/T0/B0/XyZsecretpath",
        "secret": "topsecret", "min_severity": "critical", "clusters": ["c1"]}


def test_r20_admin_creates_a_webhook_channel_with_an_event(api):
    r = api.post(f"{API}/notification-channels", HOOK, format="json")
    assert r.status_code == 201, r.json()
    body = r.json()
    assert body["has_secret"] is True and "secret" not in body
    assert "topsecret" not in json.dumps(body)
    assert body["url"] == HOOK["url"], "admins see the whole URL"
    assert body["last_delivery"] is None
    ch = Channel.objects.get()
    assert (ch.secret, ch.min_severity, ch.clusters) == ("topsecret", "critical", ["c1"])
    assert Event.objects.filter(event="ChannelCreated", subject_name="ops-hook").exists()


def test_r20_read_only_user_reads_but_never_the_secret_or_full_url(api, ro_api):
    api.post(f"{API}/notification-channels", HOOK, format="json")
    r = ro_api.get(f"{API}/notification-channels")
    assert r.status_code == 200
    (row,) = r.json()
    assert row["url"] == "https://hooks.example.com/…"
    assert "topsecret" not in r.content.decode() and "XyZsecretpath" not in r.content.decode()
    r = ro_api.post(f"{API}/notification-channels", {**HOOK, "name": "x"}, format="json")
    assert r.status_code == 403 and "error" in r.json()
    assert Channel.objects.count() == 1
    assert ro_api.post(f"{API}/notification-channels/{row['id']}/test").status_code == 403


@pytest.mark.parametrize("url, fragment", [
    ("ftp://example.com/hook", "http:// or https://"),
    ("https://user:pw@example.com/hook", "user or password"),
    ("https:///nohost", "no host"),
    ("https://example.com/hook#x", "fragment"),
    ("https://example.com:99999/hook", "not valid"),
    ("", "needs a url"),
    ("http://169.254.169.254/latest/meta-data", "link-local"),
    ("http://[fe80::1]/hook", "link-local"),
])
def test_r20_r31_bad_webhook_urls_refused_with_reason(api, url, fragment):
    r = api.post(f"{API}/notification-channels", {**HOOK, "url": url}, format="json")
    assert r.status_code == 400
    assert fragment in r.json()["error"]
    assert not Channel.objects.exists() and not Event.objects.exists()


def test_r20_bad_channels_refused(api):
    cases = [
        ({"kind": "email", "url": "", "recipients": ["not-an-address"]}, "e-mail address"),
        ({"kind": "email", "url": "", "recipients": []}, "at least one address"),
        ({"kind": "pager"}, "kind"),
        ({"min_severity": "loud"}, "min_severity"),
        ({"kinds": ["host down!"]}, "kinds"),
        ({"name": ""}, "name"),
    ]
    for change, fragment in cases:
        r = api.post(f"{API}/notification-channels", {**HOOK, **change}, format="json")
        assert r.status_code == 400, change
        assert fragment in r.json()["error"], (change, r.json())
    assert not Channel.objects.exists()
    api.post(f"{API}/notification-channels", HOOK, format="json")
    r = api.post(f"{API}/notification-channels", HOOK, format="json")
    assert r.status_code == 400 and "exists" in r.json()["error"]


def test_r20_patch_keeps_the_secret_unless_given_and_names_changes(api):
    pk = api.post(f"{API}/notification-channels", HOOK, format="json").json()["id"]
    r = api.patch(f"{API}/notification-channels/{pk}", {"enabled": False}, format="json")
    assert r.status_code == 200 and r.json()["enabled"] is False
    assert Channel.objects.get().secret == "topsecret"
    ev = Event.objects.filter(event="ChannelChanged").latest("id")
    assert ev.field == "enabled"
    r = api.patch(f"{API}/notification-channels/{pk}", {"secret": ""}, format="json")
    assert r.json()["has_secret"] is False
    assert "secret" in Event.objects.filter(event="ChannelChanged").latest("id").field
    r = api.patch(f"{API}/notification-channels/{pk}", {"url": "gopher://x"}, format="json")
    assert r.status_code == 400
    assert Channel.objects.get().url == HOOK["url"]


def test_r20_switch_to_email_and_delete(api):
    pk = api.post(f"{API}/notification-channels", HOOK, format="json").json()["id"]
    r = api.patch(f"{API}/notification-channels/{pk}",
                  {"kind": "email", "url": "", "recipients": ["a@example.com"]},
                  format="json")
    assert r.status_code == 200, r.json()
    assert r.json()["recipients"] == ["a@example.com"]
    assert api.delete(f"{API}/notification-channels/{pk}").status_code == 204
    assert not Channel.objects.exists()
    assert Event.objects.filter(event="ChannelDeleted").exists()
    assert api.get(f"{API}/notification-channels/{pk}").status_code == 404


def test_r20_send_test_is_queued_and_delivered(api, ro_api):
    receiver = Receiver(secret="topsecret")
    s = sender.Sender("api-test")
    try:
        pk = api.post(f"{API}/notification-channels",
                      {**HOOK, "url": receiver.url, "enabled": False},
                      format="json").json()["id"]
        r = api.post(f"{API}/notification-channels/{pk}/test")
        assert r.status_code == 202
        d = r.json()
        assert (d["transition"], d["state"], d["channel"]) == ("test", "pending", pk)
        assert Event.objects.filter(event="NotificationTest").exists()

        s.send_now()  # the engine's sender (here in this thread)
        (req,) = receiver.requests
        assert req["signature_ok"] and req["json"]["transition"] == "test"
        r = ro_api.get(f"{API}/deliveries/{d['id']}")
        assert r.status_code == 200
        assert r.json()["state"] == "sent" and r.json()["attempts"] == 1
        assert r.json()["payload"]["transition"] == "test"
        row = ro_api.get(f"{API}/notification-channels/{pk}").json()
        assert row["last_delivery"]["state"] == "sent"
    finally:
        s.stop(wait=True)
        receiver.close()


def test_r20_deliveries_list_filters_and_shows_errors(api, ro_api):
    pk = api.post(f"{API}/notification-channels", HOOK, format="json").json()["id"]
    ch = Channel.objects.get()
    from django.utils import timezone

    from notify import outbox

    outbox.enqueue_test(ch, now=timezone.now())
    d2 = outbox.enqueue_test(ch, now=timezone.now())
    Delivery.objects.filter(pk=d2.pk).update(state=DeliveryState.FAILED, attempts=10,
                                             last_error="HTTP 500: boom")
    r = ro_api.get(f"{API}/deliveries", {"state": "failed", "channel": pk})
    assert r.status_code == 200
    (row,) = r.json()
    assert (row["id"], row["last_error"], row["attempts"]) == (d2.pk, "HTTP 500: boom", 10)
    assert row["channel_name"] == "ops-hook"
    assert len(ro_api.get(f"{API}/deliveries").json()) == 2
    assert ro_api.get(f"{API}/deliveries", {"state": "lost"}).status_code == 400
    assert ro_api.get(f"{API}/deliveries/999999").status_code == 404


def test_r20_api_needs_credentials():
    assert APIClient().get(f"{API}/notification-channels").status_code == 401
    assert APIClient().get(f"{API}/deliveries").status_code == 401


def test_r20_openapi_documents_the_notification_endpoints():
    doc = APIClient().get(f"{API}/openapi.json").json()
    for p in ("/api/v1/notification-channels", "/api/v1/notification-channels/{id}",
              "/api/v1/notification-channels/{id}/test", "/api/v1/deliveries",
              "/api/v1/deliveries/{id}"):
        assert p in doc["paths"], p
