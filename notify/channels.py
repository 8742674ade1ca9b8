"""Channel rules and changes (R20, R31): what a valid channel is, and saving or
deleting one with its event in the same transaction. The API and the admin both use
these, so a channel is checked the same way wherever it is made."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import transaction

from hadash.choices import Subject
from hadash.events import record_event

from .models import Channel, ChannelKind

KIND_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
MAX_RECIPIENTS = 50
MAX_LIST = 100


def url_problem(url: str) -> str | None:
    """R31 for webhooks, which go outside: an http(s) URL with a host, no
    user:password and no fragment. None when fine."""
    if not url:
        return "a webhook needs a url"
    if len(url) > 2000:
        return "the url is longer than 2000 characters"
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        return "the url contains spaces or control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError as exc:
        return f"the url is not valid: {exc}"
    if parts.scheme not in ("http", "https"):
        return "the url must start with http:// or https://"
    if not parts.hostname:
        return "the url has no host"
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        return ("the url must not carry a user or password (use the channel's secret to "
                "sign deliveries instead)")
    if parts.fragment or url.endswith("#"):
        return "the url must not have a #fragment"
    try:
        address = ipaddress.ip_address(parts.hostname)
    except ValueError:
        address = None
    if address is not None and address.is_link_local:
        return ("the url must not point at a link-local address (169.254.0.0/16, "
                "fe80::/10: cloud metadata services live there)")
    return None


def _names(value, field: str, pattern=None, max_len: int = 255) -> list[str]:
    if value in (None, ""):
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValidationError({field: "give a list of names (strings)"})
    if len(value) > MAX_LIST:
        raise ValidationError({field: f"at most {MAX_LIST} entries"})
    out = []
    for v in value:
        v = v.strip()
        bad = (not v or len(v) > max_len or (pattern and not pattern.match(v))
               or any(ord(c) < 32 for c in v))
        if bad:
            raise ValidationError({field: f"{v!r} is not a valid entry"})
        if v not in out:
            out.append(v)
    return out


def recipients_list(value) -> list[str]:
    if isinstance(value, str):
        value = [v for v in re.split(r"[\s,;]+", value) if v]
    recipients = _names(value, "recipients", max_len=254)
    if len(recipients) > MAX_RECIPIENTS:
        raise ValidationError({"recipients": f"at most {MAX_RECIPIENTS} addresses"})
    for r in recipients:
        try:
            validate_email(r)
        except ValidationError:
            raise ValidationError({"recipients": f"{r!r} is not an e-mail address"}) from None
    return recipients


def clean(channel: Channel) -> None:
    """Check and normalise a channel (raises ValidationError naming the field)."""
    if channel.kind not in ChannelKind.values:
        raise ValidationError({"kind": f"one of {', '.join(ChannelKind.values)}"})
    channel.kinds = _names(channel.kinds, "kinds", KIND_PATTERN, 64)
    channel.clusters = _names(channel.clusters, "clusters")
    channel.recipients = recipients_list(channel.recipients)
    if channel.kind == ChannelKind.EMAIL:
        if not channel.recipients:
            raise ValidationError({"recipients": "an e-mail channel needs at least one "
                                                 "address"})
        if channel.url:
            raise ValidationError({"url": "an e-mail channel has no url"})
    else:
        problem = url_problem(channel.url or "")
        if problem:
            raise ValidationError({"url": problem})
        if channel.recipients:
            raise ValidationError({"recipients": "only e-mail channels have recipients"})
    if len(channel.secret or "") > 255:
        raise ValidationError({"secret": "at most 255 characters"})


CHANGED_FIELDS = ("name", "kind", "url", "recipients", "enabled", "min_severity", "kinds",
                  "clusters")


def save(channel: Channel, *, by: str, now, secret_changed: bool = False) -> Channel:
    """Create or update the channel with a ChannelCreated/ChannelChanged event (which
    names the fields changed; the secret's value never appears)."""
    created = channel.pk is None
    with transaction.atomic():
        changed = []
        if not created:
            old = Channel.objects.select_for_update().get(pk=channel.pk)
            changed = [f for f in CHANGED_FIELDS if getattr(old, f) != getattr(channel, f)]
            if secret_changed or old.secret != channel.secret:
                changed.append("secret")
        channel.save()
        if created:
            record_event(Subject.CHANNEL, channel, event="ChannelCreated", now=now,
                         new=channel.kind, message=f"notification channel {channel.name} "
                         f"({channel.kind}) created by {by}")
        elif changed:
            record_event(Subject.CHANNEL, channel, event="ChannelChanged", now=now,
                         field=",".join(changed)[:64],
                         message=f"notification channel {channel.name} changed by {by}: "
                         f"{', '.join(changed)}")
    return channel


def delete(channel: Channel, *, by: str, now) -> None:
    with transaction.atomic():
        record_event(Subject.CHANNEL, channel, event="ChannelDeleted", now=now,
                     message=f"notification channel {channel.name} deleted by {by} "
                     "(with its deliveries)")
        channel.delete()
