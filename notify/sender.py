"""The notification sender (SPEC R20): runs in a thread of every engine loop
(``hadash.ha.runtime.EngineLoop.start_side_loops``), beside HA and never in its way.

Each step claims due deliveries by one conditional UPDATE that marks them ``sending``
under a claim token of this sender (a lease: ``taken_by``/``taken_at``). Two engine
processes never send the same delivery at once; a delivery whose sender died mid-send
is due again once its lease (LEASE) has passed, and goes out again with the same
idempotency key, so the receiver can drop the duplicate.

Sends happen outside any transaction, with short timeouts, on a small thread pool:
one job per channel, which sends that channel's claimed deliveries in order. A slow or
dead receiver holds one thread and its own channel only; while a channel is busy this
sender claims nothing more for it. A failure is retried with exponential back-off
(BACKOFF_FIRST … BACKOFF_MAX) up to MAX_ATTEMPTS attempts, then the delivery is
``failed`` (with a ``NotificationFailed`` event). One log line per failure.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import itertools
import json
import logging
import queue
import threading
from collections import defaultdict
from concurrent.futures import Future

import httpx
from django.apps import apps
from django.conf import settings
from django.db import close_old_connections, connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from hadash import outage
from hadash.choices import Severity, Subject, Transition

from . import outbox
from .models import Channel, ChannelKind, Delivery, DeliveryState

log = logging.getLogger("hadash.notify")

LEASE = dt.timedelta(seconds=60)  # well above one send's timeouts
CONNECT_TIMEOUT = 5.0
TIMEOUT = 10.0  # per read/write of a webhook; the SMTP socket's timeout
MAX_ATTEMPTS = 10
BACKOFF_FIRST = 5  # seconds before the 2nd attempt; doubled each time …
BACKOFF_MAX = 600  # … up to 10 minutes (10 attempts span about 30 minutes)
POLL = 1.0  # seconds between looks for due deliveries (queued here: at once)
THREADS = 8  # channels sending at the same time, per engine process
PER_CHANNEL = 20  # deliveries one channel's job takes at a time
KEEP = dt.timedelta(days=30)  # sent and failed deliveries are purged after this
PURGE_EVERY = dt.timedelta(hours=1)
SIGNATURE_HEADER = "X-Hadash-Signature"


def backoff(attempts: int) -> int:
    """Seconds to wait after the ``attempts``-th failed attempt."""
    return min(BACKOFF_FIRST * 2 ** max(0, attempts - 1), BACKOFF_MAX)


def body_bytes(payload: dict) -> bytes:
    """The JSON body of a webhook: the same bytes on every attempt."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True,
                      ensure_ascii=False).encode()


def signature(secret: str, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256 of the body>`` (X-Hadash-Signature)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class SendError(Exception):
    pass


def count(outcome: str) -> None:
    """R21: hadash_notifications_total{outcome=sent|failed|retried}, per attempt, in
    the transaction that records the attempt's outcome."""
    if apps.is_installed("metrics"):
        from metrics.counters import inc

        inc("notifications", outcome=outcome)


# --- sending one ----------------------------------------------------------------------


def send_webhook(channel: Channel, delivery: Delivery) -> None:
    body = body_bytes(delivery.payload)
    headers = {"Content-Type": "application/json", "User-Agent": "hadash-notify",
               "Idempotency-Key": delivery.idempotency_key,
               "X-Hadash-Delivery": str(delivery.pk),
               "X-Hadash-Transition": delivery.transition}
    if channel.secret:
        headers[SIGNATURE_HEADER] = signature(channel.secret, body)
    try:
        response = httpx.post(channel.url, content=body, headers=headers,
                              follow_redirects=False, trust_env=False,
                              timeout=httpx.Timeout(TIMEOUT, connect=CONNECT_TIMEOUT))
    except httpx.TimeoutException as exc:
        raise SendError(f"timed out ({type(exc).__name__})") from None
    except httpx.HTTPError as exc:
        raise SendError(f"{type(exc).__name__}: {exc}") from None
    if not 200 <= response.status_code < 300:
        text = " ".join(response.text.split())[:200]
        raise SendError(f"HTTP {response.status_code}" + (f": {text}" if text else ""))


def send_email(channel: Channel, delivery: Delivery) -> None:
    from django.core.mail import EmailMessage, get_connection

    if not channel.recipients:
        raise SendError("the channel has no recipients")
    mail = getattr(settings, "HADASH_SMTP", {})
    try:
        conn = get_connection(
            "django.core.mail.backends.smtp.EmailBackend", fail_silently=False,
            host=mail.get("host", "localhost"), port=mail.get("port", 25),
            username=mail.get("user", ""), password=mail.get("password", ""),
            use_tls=mail.get("starttls", False), timeout=TIMEOUT)
        msg = EmailMessage(
            subject=delivery.payload.get("subject", "[hadash]"),
            body=delivery.payload.get("text", ""),
            from_email=mail.get("from") or "hadash@localhost",
            to=list(channel.recipients), connection=conn,
            headers={"Message-ID": f"<{delivery.idempotency_key}@hadash>",
                     "Idempotency-Key": delivery.idempotency_key})
        msg.send()
    except Exception as exc:  # smtplib, socket and ssl errors alike
        raise SendError(f"{type(exc).__name__}: {exc}") from None


def send(channel: Channel, delivery: Delivery) -> None:
    """One attempt; raises SendError when it did not go through."""
    if channel.kind == ChannelKind.EMAIL:
        send_email(channel, delivery)
    else:
        send_webhook(channel, delivery)


# --- the sender -------------------------------------------------------------------------


class DaemonPool:
    """A fixed pool of daemon threads: like ThreadPoolExecutor, except that a send
    stuck in a receiver's timeout never holds up the process's exit (an unsent or
    half-sent delivery is leased and goes out again from another sender)."""

    def __init__(self, size: int, name: str):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                        for i in range(size)]
        for t in self.threads:
            t.start()

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self.jobs.put((future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)

    def shutdown(self, wait: bool = False) -> None:
        while True:  # cancel what has not started
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        for _ in self.threads:
            self.jobs.put(None)
        if wait:
            for t in self.threads:
                t.join()


def due_q(now) -> Q:
    return (Q(state=DeliveryState.PENDING, next_attempt__lte=now)
            | Q(state=DeliveryState.SENDING, taken_at__lt=now - LEASE))


class Sender:
    def __init__(self, loop_id: str, *, threads: int = THREADS, clock=timezone.now):
        self.id = f"{loop_id}/notify"[:80]
        self.clock = clock
        self.pool = DaemonPool(threads, name="notify-send")
        self.busy: set[int] = set()  # channels with a job running here
        self.lock = threading.Lock()
        self.claims = itertools.count(1)
        self.last_purge: dt.datetime | None = None

    # claiming

    def claim(self, now=None) -> dict[int, list[Delivery]]:
        """Take due deliveries of channels not busy here: one UPDATE, conditional on
        each row still being due, so a row another sender took meanwhile is skipped."""
        now = now or self.clock()
        with self.lock:
            busy = set(self.busy)
        rows = (Delivery.objects.filter(due_q(now))
                .filter(Q(channel__enabled=True) | Q(transition=Transition.TEST))
                .exclude(channel_id__in=busy)
                .order_by("next_attempt", "id").values_list("id", "channel_id")[:500])
        per_channel: dict[int, list[int]] = defaultdict(list)
        for pk, channel_id in rows:
            if len(per_channel[channel_id]) < PER_CHANNEL:
                per_channel[channel_id].append(pk)
        ids = [pk for pks in per_channel.values() for pk in pks]
        if not ids:
            return {}
        token = f"{self.id}#{next(self.claims)}"
        Delivery.objects.filter(due_q(now), id__in=ids).update(
            state=DeliveryState.SENDING, taken_by=token, taken_at=now,
            attempts=F("attempts") + 1)
        claimed: dict[int, list[Delivery]] = defaultdict(list)
        for d in (Delivery.objects.filter(id__in=ids, taken_by=token,
                                          state=DeliveryState.SENDING)
                  .select_related("channel").order_by("id")):
            claimed[d.channel_id].append(d)
        return dict(claimed)

    def step(self, now=None) -> list[Future]:
        """Claim what is due and hand each channel's share to a thread."""
        now = now or self.clock()
        self.purge(now)
        futures = []
        for channel_id, deliveries in self.claim(now).items():
            with self.lock:
                self.busy.add(channel_id)
            futures.append(self.pool.submit(self._threaded_job, channel_id, deliveries))
        return futures

    def send_now(self, now=None) -> int:
        """Claim what is due and send it in this thread, channel after channel (tests,
        tools). Returns how many deliveries were claimed."""
        claimed = self.claim(now)
        for channel_id, deliveries in claimed.items():
            with self.lock:
                self.busy.add(channel_id)
            self._channel_job(channel_id, deliveries)
        return sum(len(d) for d in claimed.values())

    def _threaded_job(self, channel_id: int, deliveries: list[Delivery]) -> None:
        try:
            self._channel_job(channel_id, deliveries)
        finally:
            connection.close()
            outbox.due.set()  # look again: more may be due for this channel

    def _channel_job(self, channel_id: int, deliveries: list[Delivery]) -> None:
        try:
            for i, d in enumerate(deliveries):
                if not self.deliver(d):
                    # This receiver is failing: give the rest back untried (their
                    # attempt not counted), due again with the failed one's back-off.
                    rest = [x.pk for x in deliveries[i + 1:]]
                    if rest:
                        again = max(d.next_attempt,
                                    self.clock() + dt.timedelta(seconds=BACKOFF_FIRST))
                        Delivery.objects.filter(
                            pk__in=rest, taken_by=d.taken_by,
                            state=DeliveryState.SENDING,
                        ).update(state=DeliveryState.PENDING, taken_by="", taken_at=None,
                                 attempts=F("attempts") - 1, next_attempt=again)
                    break
        except outage.DB_ERRORS as exc:
            outage.failed("notification sender", exc)
        except Exception:
            log.exception("notification sender: channel %s job failed", channel_id)
        finally:
            with self.lock:
                self.busy.discard(channel_id)

    def deliver(self, delivery: Delivery) -> bool:
        """Send one claimed delivery and record the outcome (if it is still ours).
        True when it went out."""
        token = delivery.taken_by
        # Renew the lease just before sending: it then covers this one send.
        if not Delivery.objects.filter(pk=delivery.pk, taken_by=token,
                                       state=DeliveryState.SENDING).update(
                                           taken_at=self.clock()):
            return True  # no longer ours (lease expired, another sender has it)
        channel = delivery.channel
        try:
            send(channel, delivery)
        except SendError as exc:
            self.failed(delivery, str(exc))
            return False
        with transaction.atomic():
            if Delivery.objects.filter(pk=delivery.pk, taken_by=token,
                                       state=DeliveryState.SENDING).update(
                    state=DeliveryState.SENT, sent_at=self.clock(), last_error=""):
                count("sent")
        return True

    def failed(self, delivery: Delivery, error: str) -> None:
        now = self.clock()
        error = error[:500]
        mine = Delivery.objects.filter(pk=delivery.pk, taken_by=delivery.taken_by,
                                       state=DeliveryState.SENDING)
        channel = delivery.channel
        if delivery.attempts >= MAX_ATTEMPTS:
            log.warning("notification #%s (%s) to channel %s failed for good after %d "
                        "attempts: %s", delivery.pk, delivery.transition, channel.name,
                        delivery.attempts, error)
            from hadash.events import record_event

            with transaction.atomic():
                if mine.update(state=DeliveryState.FAILED, last_error=error,
                               taken_by="", taken_at=None):
                    count("failed")
                    record_event(
                        Subject.CHANNEL, channel, event="NotificationFailed", now=now,
                        new=delivery.transition, severity=Severity.WARNING,
                        message=f"notification #{delivery.pk} ({delivery.transition}) to "
                                f"channel {channel.name} failed after {delivery.attempts} "
                                f"attempts: {error}")
            return
        wait = backoff(delivery.attempts)
        log.warning("notification #%s (%s) to channel %s failed (attempt %d of %d, next in "
                    "%ds): %s", delivery.pk, delivery.transition, channel.name,
                    delivery.attempts, MAX_ATTEMPTS, wait, error)
        with transaction.atomic():
            if mine.update(state=DeliveryState.PENDING, last_error=error, taken_by="",
                           taken_at=None, next_attempt=now + dt.timedelta(seconds=wait)):
                count("retried")
        delivery.next_attempt = now + dt.timedelta(seconds=wait)

    def purge(self, now) -> int:
        if self.last_purge is not None and now - self.last_purge < PURGE_EVERY:
            return 0
        self.last_purge = now
        n, _ = Delivery.objects.filter(
            state__in=[DeliveryState.SENT, DeliveryState.FAILED],
            created__lt=now - KEEP).delete()
        return n

    def stop(self, wait: bool = False) -> None:
        self.pool.shutdown(wait=wait)


_running_lock = threading.Lock()
_running: dict = {}  # the sender thread of this process: its stopping event and thread


def run_sender(stopping: threading.Event, loop_id: str) -> None:
    """The engine loop's side thread: send due deliveries until ``stopping``. One per
    process: an engine loop started while another's sender still runs (a loop that
    failed and was restarted under the same stop event) leaves it at that."""
    me = threading.current_thread()
    with _running_lock:
        other = _running.get("thread")
        if other is not None and other is not me and other.is_alive() \
                and not _running["stopping"].is_set():
            log.debug("notification sender already running in this process")
            return
        _running.update(thread=me, stopping=stopping)
    sender = Sender(loop_id)
    log.debug("notification sender %s started", sender.id)
    try:
        while not stopping.is_set():
            outbox.due.clear()
            try:
                sender.step()
                outage.ok()
            except outage.DB_ERRORS as exc:
                outage.failed("notification sender", exc)
            except Exception:
                log.exception("notification sender %s step failed", sender.id)
                close_old_connections()
            outbox.due.wait(POLL)
    finally:
        sender.stop()
        connection.close()
