"""R20: notifications are queued in the transaction of the alert change that causes
them and sent by the engine's sender to real receivers (an HTTP server checking the
HMAC signature, an SMTP server): filters, retries with back-off, final failure, leases
across a crash, Alertmanager's body, e-mail, and a dead receiver that delays no other
channel."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from django.db import transaction
from django.test import override_settings
from django.utils import timezone

from hadash.alerts import open_alert, resolve_alert, update_incident_alert
from hadash.choices import IncidentKind, Severity, Subject, Transition
from hadash.models import Event, Incident
from metrics import counters
from notify import outbox, sender
from notify.models import Channel, ChannelKind, Delivery, DeliveryState
from notify.tests.receivers import Receiver, SmtpServer, closed_port_url

WAIT = 30  # seconds a test waits for something that should happen (a safety net only)


def wait_for(condition) -> bool:
    """Poll ``condition`` until true (False after WAIT seconds: a safety net)."""
    pause = threading.Event()
    for _ in range(WAIT * 20):
        if condition():
            return True
        pause.wait(0.05)
    return condition()


class Clock:
    """The senders' time, set by the test (a minute ahead: what tests queue with the
    real time is due)."""

    def __init__(self):
        self.t = timezone.now() + dt.timedelta(minutes=1)

    def __call__(self):
        return self.t

    def advance(self, seconds: float):
        self.t += dt.timedelta(seconds=seconds)


@pytest.fixture
def receiver():
    r = Receiver(secret="s3cret")
    yield r
    r.close()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def make_sender(clock):
    made = []

    def make(loop_id="loop-a", **kw):
        s = sender.Sender(loop_id, clock=kw.pop("clock", clock), **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop(wait=True)


def webhook(name="hook", url="http://127.0.0.1:9/", **kw) -> Channel:
    kw.setdefault("secret", "s3cret")
    return Channel.objects.create(name=name, kind=kw.pop("kind", ChannelKind.WEBHOOK),
                                  url=url, **kw)


def raise_alert(name="kvm-01", *, now=None, severity=Severity.CRITICAL, cluster="c1",
                kind="host-down", incident=None):
    with transaction.atomic():
        alert, _ = open_alert(kind, Subject.HOST, name, now=now or timezone.now(),
                              title=f"Host {name} is not responding", severity=severity,
                              cluster=cluster, message="no ping for 30 s",
                              incident=incident)
    return alert


# --- queued with the change ------------------------------------------------------------


@pytest.mark.django_db
def test_r20_alert_opened_queues_a_delivery_in_its_transaction():
    hook = webhook()
    alert = raise_alert()
    d = Delivery.objects.get()
    assert (d.channel, d.alert, d.transition, d.state) == (hook, alert,
                                                           Transition.OPENED, "pending")
    assert d.payload["alert"]["title"] == "Host kvm-01 is not responding"
    assert d.idempotency_key.startswith("hadash-")

    # A change that rolls back leaves no delivery behind.
    with pytest.raises(RuntimeError), transaction.atomic():
        open_alert("engine-stalled", Subject.ENGINE, "e", now=timezone.now(),
                   title="Engine stalled", severity=Severity.CRITICAL)
        raise RuntimeError("the cause's transaction fails")
    assert Delivery.objects.count() == 1


@pytest.mark.django_db
def test_r20_a_message_that_cannot_be_composed_never_undoes_the_change(monkeypatch):
    """Notifications ride on the change's transaction; a bug composing one must not
    roll back the alert (or the HA step behind it): a plain message goes instead."""
    webhook()

    def broken(*args, **kwargs):
        raise KeyError("bug")

    monkeypatch.setattr(outbox, "compose", broken)
    alert = raise_alert()
    d = Delivery.objects.get()
    assert d.alert == alert and d.payload["alert"]["id"] == alert.pk
    assert d.payload["subject"] == "[hadash] CRITICAL: Host kvm-01 is not responding"


@pytest.mark.django_db
def test_r20_channel_filters_severity_kinds_clusters_and_disabled():
    webhook("all", min_severity=Severity.INFO)
    webhook("critical-only", min_severity=Severity.CRITICAL)
    webhook("host-down-only", min_severity=Severity.INFO, kinds=["host-down"])
    webhook("c2-only", min_severity=Severity.INFO, clusters=["c2"])
    webhook("off", min_severity=Severity.INFO, enabled=False)

    raise_alert("kvm-01", severity=Severity.WARNING, cluster="c1")
    raise_alert("kvm-02", severity=Severity.CRITICAL, cluster="c2", kind="bmc-check")

    got = {(d.channel.name, d.alert.subject_name) for d in Delivery.objects.all()}
    assert got == {("all", "kvm-01"), ("all", "kvm-02"), ("critical-only", "kvm-02"),
                   ("host-down-only", "kvm-01"), ("c2-only", "kvm-02")}


# --- sent -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_r20_webhook_delivered_signed_with_idempotency_key(receiver, make_sender):
    webhook(url=receiver.url)
    alert = raise_alert()
    d = Delivery.objects.get()

    assert make_sender().send_now() == 1

    (req,) = receiver.requests
    assert req["signature_ok"], "X-Hadash-Signature is the HMAC-SHA256 of the body"
    assert req["key"] == d.idempotency_key
    body = req["json"]
    assert body["transition"] == "opened" and body["severity"] == "critical"
    assert body["alert"]["id"] == alert.pk and body["alert"]["cluster"] == "c1"
    d.refresh_from_db()
    assert (d.state, d.attempts, d.last_error) == (DeliveryState.SENT, 1, "")
    assert d.sent_at is not None


@pytest.mark.django_db
def test_r20_unsigned_webhook_without_secret(receiver, make_sender):
    webhook(url=receiver.url, secret="")
    raise_alert()
    make_sender().send_now()
    (req,) = receiver.requests
    assert "X-Hadash-Signature" not in req["headers"]


@pytest.mark.django_db
def test_r20_crash_between_commit_and_send_loses_nothing(receiver, make_sender, clock):
    """Committed with the change, the delivery waits for any sender: the one that
    crashed before sending is not needed, a fresh one (another process) sends it."""
    webhook(url=receiver.url)
    raise_alert(now=clock())
    # No sender ran (the process died right after the commit) …
    assert Delivery.objects.get().state == DeliveryState.PENDING
    # … a fresh engine process's sender delivers it.
    make_sender("fresh-loop").send_now()
    assert len(receiver.requests) == 1
    assert Delivery.objects.get().state == DeliveryState.SENT


@pytest.mark.django_db
def test_r20_crash_mid_send_retaken_after_lease_with_same_key(receiver, make_sender, clock):
    webhook(url=receiver.url)
    raise_alert(now=clock())
    a, b = make_sender("loop-a"), make_sender("loop-b")

    claimed = a.claim()  # loop-a takes it, then dies before sending
    assert sum(len(v) for v in claimed.values()) == 1
    assert b.send_now() == 0, "another sender never takes a delivery under lease"
    clock.advance(sender.LEASE.total_seconds() - 1)
    assert b.send_now() == 0

    clock.advance(2)  # the lease has passed: loop-b sends it, with the same key
    assert b.send_now() == 1
    d = Delivery.objects.get()
    assert [r["key"] for r in receiver.requests] == [d.idempotency_key]
    assert (d.state, d.attempts) == (DeliveryState.SENT, 2)


@pytest.mark.django_db
def test_r20_retries_with_backoff_then_sends(make_sender, clock):
    r = Receiver(status=[500, 503, 200])
    try:
        webhook(url=r.url)
        raise_alert(now=clock())
        s = make_sender()
        s.send_now()
        d = Delivery.objects.get()
        assert (d.state, d.attempts) == (DeliveryState.PENDING, 1)
        assert d.last_error.startswith("HTTP 500")
        assert d.next_attempt == clock() + dt.timedelta(seconds=sender.BACKOFF_FIRST)

        clock.advance(sender.BACKOFF_FIRST - 1)
        assert s.send_now() == 0, "not due before its back-off"
        clock.advance(1)
        s.send_now()
        d.refresh_from_db()
        assert d.last_error.startswith("HTTP 503") and d.attempts == 2
        assert d.next_attempt == clock() + dt.timedelta(seconds=2 * sender.BACKOFF_FIRST)

        clock.advance(2 * sender.BACKOFF_FIRST)
        s.send_now()
        d.refresh_from_db()
        assert (d.state, d.attempts, d.last_error) == (DeliveryState.SENT, 3, "")
        assert len({req["key"] for req in r.requests}) == 1, "one key for every attempt"
        # R21: hadash_notifications_total counts each attempt by outcome.
        totals = counters.totals()
        assert totals[("notifications", "outcome=retried")] == 2
        assert totals[("notifications", "outcome=sent")] == 1
    finally:
        r.close()


@pytest.mark.django_db
def test_r20_gives_up_after_max_attempts_with_an_event(make_sender, clock, caplog):
    hook = webhook(url=closed_port_url())
    raise_alert(now=clock())
    s = make_sender()
    waits = []
    for _ in range(sender.MAX_ATTEMPTS):
        assert s.send_now() == 1
        d = Delivery.objects.get()
        if d.state == DeliveryState.PENDING:
            waits.append((d.next_attempt - clock()).total_seconds())
            clock.t = d.next_attempt
    assert waits == [min(5 * 2 ** i, 600) for i in range(sender.MAX_ATTEMPTS - 1)]
    d = Delivery.objects.get()
    assert (d.state, d.attempts) == (DeliveryState.FAILED, sender.MAX_ATTEMPTS)
    assert counters.totals()[("notifications", "outcome=failed")] == 1
    assert "ConnectError" in d.last_error
    clock.advance(3600)
    assert s.send_now() == 0, "a failed delivery is not tried again"
    ev = Event.objects.get(event="NotificationFailed")
    assert ev.subject == Subject.CHANNEL and ev.subject_name == hook.name
    failures = [r for r in caplog.records if "notification #" in r.getMessage()]
    assert len(failures) == sender.MAX_ATTEMPTS, "one log line per failure"


@pytest.mark.django_db
def test_r20_a_failing_receiver_gives_back_the_rest_untried(make_sender, clock):
    r = Receiver(status=500)
    try:
        webhook(url=r.url, min_severity=Severity.INFO)
        for i in range(3):
            raise_alert(f"kvm-0{i}", now=clock())
        make_sender().send_now()
        assert len(r.requests) == 1, "after one failure the channel's others wait"
        rows = list(Delivery.objects.order_by("id").values_list("state", "attempts"))
        assert rows == [("pending", 1), ("pending", 0), ("pending", 0)]
    finally:
        r.close()


@pytest.mark.django_db
def test_r20_disabled_channel_keeps_its_deliveries_until_enabled(receiver, make_sender):
    hook = webhook(url=receiver.url)
    raise_alert()
    Channel.objects.filter(pk=hook.pk).update(enabled=False)
    s = make_sender()
    assert s.send_now() == 0
    Channel.objects.filter(pk=hook.pk).update(enabled=True)
    assert s.send_now() == 1 and len(receiver.requests) == 1


# --- bodies -----------------------------------------------------------------------------


def _incident(now):
    return Incident.objects.create(kind=IncidentKind.HOST, host_name="kvm-07", cluster="c1",
                                   title="kvm-07 stopped answering", detected_at=now,
                                   updated=now, vms_affected=3)


@pytest.mark.django_db
def test_r20_alertmanager_v4_body_firing_then_resolved(receiver, make_sender, clock):
    webhook("am", url=receiver.url, kind=ChannelKind.ALERTMANAGER)
    inc = _incident(clock())
    raise_alert("kvm-07", now=clock(), incident=inc)
    with transaction.atomic():
        update_incident_alert(inc, now=clock(), title="kvm-07 declared Down",
                              transition=Transition.DECLARED)
    clock.advance(60)
    with transaction.atomic():
        resolve_alert(incident=inc, now=clock(), message="all 3 VMs running again")
    make_sender().send_now()

    bodies = [r["json"] for r in receiver.requests]
    assert [b["status"] for b in bodies] == ["firing", "firing", "resolved"]
    for b in bodies:
        assert b["version"] == "4" and b["receiver"] == "am"
        assert len(b["alerts"]) == 1 and b["truncatedAlerts"] == 0
        assert set(b) >= {"groupKey", "groupLabels", "commonLabels", "commonAnnotations",
                          "externalURL"}
    first, _declared, last = (b["alerts"][0] for b in bodies)
    assert first["labels"]["alertname"] == "HadashHostDown"
    assert first["labels"]["severity"] == "critical"
    assert first["labels"]["cluster"] == "c1" and first["labels"]["host"] == "kvm-07"
    assert first["labels"]["incident"] == str(inc.pk)
    assert first["annotations"]["summary"] == "Host kvm-07 is not responding"
    assert first["endsAt"] == "0001-01-01T00:00:00Z"
    assert _declared["annotations"]["transition"] == "declared"
    assert last["status"] == "resolved" and last["endsAt"].startswith(
        clock().strftime("%Y-%m-%dT%H:%M"))
    assert len({a["fingerprint"] for a in (first, _declared, last)}) == 1
    assert first["startsAt"] == last["startsAt"]


@pytest.mark.django_db
def test_r20_generic_body_carries_incident_and_links(receiver, make_sender, clock):
    webhook(url=receiver.url)
    inc = _incident(clock())
    with override_settings(HADASH_PUBLIC_URL="https://hadash.example.com"):
        raise_alert("kvm-07", now=clock(), incident=inc)
    make_sender().send_now()
    body = receiver.requests[0]["json"]
    assert body["incident"]["id"] == inc.pk and body["incident"]["host"] == "kvm-07"
    assert body["incident"]["vms_affected"] == 3
    assert body["links"]["incident"] == f"https://hadash.example.com/incidents/{inc.pk}"
    assert body["idempotency_key"] == receiver.requests[0]["key"]


@pytest.mark.django_db
def test_r20_email_through_a_real_smtp_server(make_sender, clock):
    smtp = SmtpServer()
    try:
        ch = Channel.objects.create(name="oncall", kind=ChannelKind.EMAIL,
                                    recipients=["oncall@example.com", "ops@example.com"])
        with override_settings(HADASH_SMTP={"host": "127.0.0.1", "port": smtp.port,
                                             "from": "hadash@example.com"}):
            raise_alert(now=clock())
            make_sender().send_now()
        d = Delivery.objects.get(channel=ch)
        assert d.state == DeliveryState.SENT, d.last_error
        ((rcpts, mail),) = smtp.messages
        assert sorted(rcpts) == ["oncall@example.com", "ops@example.com"]
        assert mail["Subject"] == "[hadash] CRITICAL: Host kvm-01 is not responding"
        assert mail["From"] == "hadash@example.com"
        assert d.idempotency_key in mail["Message-ID"]
        assert "no ping for 30 s" in mail.get_payload()
    finally:
        smtp.close()


@pytest.mark.django_db
def test_r20_email_subject_stays_one_line_and_names_the_transition(make_sender, clock):
    """A title with line breaks cannot break the mail's headers; fencing shows."""
    smtp = SmtpServer()
    try:
        Channel.objects.create(name="oncall", kind=ChannelKind.EMAIL,
                               recipients=["oncall@example.com"])
        inc = _incident(clock())
        with transaction.atomic():
            open_alert("HostDown", Subject.HOST, "kvm-07", now=clock(), incident=inc,
                       title="kvm-07\r\nBcc: victim@example.com", severity="critical")
            update_incident_alert(inc, now=clock(), title="kvm-07 fenced\nreally",
                                  transition=Transition.FENCED)
        with override_settings(HADASH_SMTP={"host": "127.0.0.1", "port": smtp.port}):
            make_sender().send_now()
        assert [d.state for d in Delivery.objects.order_by("id")] == ["sent", "sent"]
        subjects = [m["Subject"] for _, m in smtp.messages]
        assert subjects == ["[hadash] CRITICAL: kvm-07 Bcc: victim@example.com",
                            "[hadash] CRITICAL: kvm-07 fenced really (fenced)"]
        assert all(rcpts == ["oncall@example.com"] for rcpts, _ in smtp.messages)
    finally:
        smtp.close()


@pytest.mark.django_db
def test_r20_email_to_a_dead_smtp_server_is_retried(make_sender, clock):
    Channel.objects.create(name="oncall", kind=ChannelKind.EMAIL,
                           recipients=["oncall@example.com"])
    port = int(closed_port_url().split(":")[2].split("/")[0])
    with override_settings(HADASH_SMTP={"host": "127.0.0.1", "port": port}):
        raise_alert(now=clock())
        make_sender().send_now()
    d = Delivery.objects.get()
    assert d.state == DeliveryState.PENDING and "refused" in d.last_error.lower()


# --- in threads, as the engine runs it ------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_r20_hanging_receiver_does_not_delay_another_channel(make_sender):
    hanging = Receiver(hold=True)
    good = Receiver(secret="s3cret")
    try:
        webhook("slow", url=hanging.url)
        webhook("fast", url=good.url)
        raise_alert()
        futures = make_sender(clock=timezone.now).step()
        assert len(futures) == 2
        assert hanging.got.wait(WAIT), "the slow channel's receiver was called"
        assert good.got.wait(WAIT), "the other channel was served meanwhile"
        fast = Delivery.objects.get(channel__name="fast")
        assert wait_for(lambda: Delivery.objects.get(pk=fast.pk).state == DeliveryState.SENT)
        assert Delivery.objects.get(channel__name="slow").state == DeliveryState.SENDING, \
            "the slow receiver still holds its own delivery, and only that"
        hanging.release.set()
        for f in futures:
            f.result(WAIT)
        assert Delivery.objects.get(channel__name="slow").state == DeliveryState.SENT
    finally:
        hanging.close()
        good.close()


@pytest.mark.django_db(transaction=True)
def test_r20_engine_side_thread_sends_what_a_commit_queued(receiver):
    """notify.sender.run_sender, as each engine loop starts it: a committed alert
    reaches the receiver without any other help."""
    webhook(url=receiver.url)
    stopping = threading.Event()
    t = threading.Thread(target=sender.run_sender, args=(stopping, "engine-test"),
                         daemon=True)
    t.start()
    try:
        raise_alert()
        assert receiver.got.wait(WAIT)
    finally:
        stopping.set()
        outbox.due.set()
        t.join(WAIT)
    assert not t.is_alive()
    assert receiver.requests[0]["json"]["transition"] == "opened"
