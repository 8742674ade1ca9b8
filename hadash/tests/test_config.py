"""Configuration through the operator API (SPEC §2): every key listed with its default,
type and description; a good value is stored, takes effect at once and writes a
ConfigChanged event; a bad value (wrong type, out of range) is refused with the reason
and changes nothing."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from hadash import config
from hadash.models import ApiToken, Configuration, Event

pytestmark = pytest.mark.django_db

API = "/api/v1"


@pytest.fixture
def api() -> APIClient:
    user = get_user_model().objects.create_user("ops", is_staff=True)
    _, key = ApiToken.issue(user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


def put(api, key, value):
    return api.put(f"{API}/config/{key}", {"value": value}, format="json")


def test_list_has_every_key_with_its_default(api):
    """SPEC §2: every key with value, default, type, category and description."""
    r = api.get(f"{API}/config")
    assert r.status_code == 200
    items = {i["name"]: i for i in r.json()}
    assert set(items) == set(config.KEYS)
    assert items["ping.interval"] | {"updated": None} == {
        "name": "ping.interval", "value": "10", "default": "10", "type": "int",
        "category": "Agent", "description": config.KEYS["ping.interval"].description,
        "min": 1.0, "max": 3600.0, "updated": None,
    }
    for name, item in items.items():
        assert {"name", "value", "default", "type", "category", "description"} <= set(item)
        assert item["default"] == config.KEYS[name].default
    assert items["ha.investigators.order"]["value"] == "CheckOnAgent,Neighbour,OutOfBand"
    assert items["force.ha"]["type"] == "bool"


def test_get_one_key(api):
    r = api.get(f"{API}/config/ha.max.hosts.down.ratio")
    assert r.status_code == 200
    assert (r.json()["value"], r.json()["type"]) == ("0.5", "float")


def test_unknown_key_is_404(api):
    r = api.get(f"{API}/config/no.such.key")
    assert r.status_code == 404 and "no.such.key" in r.json()["error"]
    r = put(api, "no.such.key", "1")
    assert r.status_code == 404 and "no.such.key" in r.json()["error"]
    assert not Event.objects.exists()


def test_put_good_value_takes_effect_with_event(api):
    """SPEC §2: ha.workers — an edit takes effect without a restart; the change is an
    event (ConfigChanged) naming who made it."""
    r = put(api, "ha.workers", "8")
    assert r.status_code == 200, r.content
    assert r.json()["value"] == "8" and r.json()["updated"] is not None
    assert config.get("ha.workers") == 8
    assert Configuration.objects.get(name="ha.workers").value == "8"
    ev = Event.objects.get(event="ConfigChanged")
    assert (ev.subject, ev.subject_name, ev.old, ev.new, ev.reason) == (
        "config", "ha.workers", "5", "8", "ops")


@pytest.mark.parametrize(
    "key,value,stored,typed",
    [("ping.timeout", 3, "3", 3.0),
     ("ping.timeout", "2.75", "2.75", 2.75),
     ("force.ha", True, "true", True),
     ("vm.ha.enabled", "off", "false", False),
     ("ha.investigators.order", " OutOfBand , CheckOnAgent", "OutOfBand,CheckOnAgent",
      ["OutOfBand", "CheckOnAgent"]),
     ("ha.tag", "ha-hosts", "ha-hosts", "ha-hosts"),
     ("ha.max.hosts.down.ratio", "1", "1", 1.0)],
)
def test_put_normalises_values(api, key, value, stored, typed):
    """SPEC §2: values are typed; the stored text is the canonical form."""
    r = put(api, key, value)
    assert r.status_code == 200, r.content
    assert r.json()["value"] == stored
    assert config.get(key) == typed


@pytest.mark.parametrize(
    "key,value,reason",
    [("ping.interval", "abc", "whole number"),
     ("ping.interval", "-1", "at least 1"),
     ("ping.interval", "2.5", "whole number"),
     ("ha.workers", "0", "at least 1"),
     ("ha.workers", "", "whole number"),
     ("ha.investigators.order", "CheckOnAgent,Psychic", "unknown investigator"),
     ("ha.investigators.order", "", "at least one"),
     ("ha.max.hosts.down.ratio", "1.5", "at most 1"),
     ("ha.max.hosts.down.ratio", "nan", "finite"),
     ("force.ha", "maybe", "true or false"),
     ("ha.tag", "a,b", "comma")],
)
def test_put_bad_value_is_400_and_changes_nothing(api, key, value, reason):
    """SPEC §2: a bad value (wrong type, out of range) is refused with a clear message."""
    before = Configuration.objects.get(name=key).value
    typed = config.get(key)
    r = put(api, key, value)
    assert r.status_code == 400
    assert reason in r.json()["error"]
    assert key in r.json()["error"]
    assert Configuration.objects.get(name=key).value == before
    assert config.get(key) == typed
    assert not Event.objects.exists()


@pytest.mark.parametrize("body", [{}, {"value": None}, {"value": [1]}, {"value": {"a": 1}}])
def test_put_without_a_scalar_value_is_400(api, body):
    r = api.put(f"{API}/config/ha.workers", body, format="json")
    assert r.status_code == 400 and "value" in r.json()["error"]
    assert config.get("ha.workers") == 5
    assert not Event.objects.exists()


def test_put_same_value_writes_no_event(api):
    assert put(api, "ha.workers", "5").status_code == 200
    assert not Event.objects.exists()


def test_read_only_user_cannot_set(api):
    """SPEC §2 keys are edited by operators (staff); a reader gets 403."""
    user = get_user_model().objects.create_user("viewer")
    _, key = ApiToken.issue(user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    r = put(client, "ha.workers", "8")
    assert r.status_code == 403
    assert config.get("ha.workers") == 5
    assert client.get(f"{API}/config/ha.workers").status_code == 200


# --- hostile values (issue 8 part 4) ------------------------------------------


@pytest.mark.parametrize(
    "key,body,reason",
    [("ha.tag", '{"value": "ha\\u0000"}', "NUL"),
     ("ha.tag", '{"value": "ha\\ud800"}', "surrogate U+D800"),
     ("ha.investigators.order", '{"value": "CheckOnAgent\\udfff"}', "surrogate"),
     ("ping.interval", '{"value": "1\\u00000"}', "NUL"),
     ("ha.tag", '{"value": "' + "t" * 4097 + '"}', "at most 4096"),
     ("ha.investigators.order", '{"value": "' + "Neighbour," * 500 + '"}', "at most 4096"),
     ("ha.workers", '{"value": "' + "9" * 5000 + '"}', "at most 4096"),
     ("ha.workers", '{"value": ' + "9" * 4000 + '}', "at most 1000"),
     ("ha.workers", '{"value": ' + "9" * 5000 + '}', "JSON"),
     ("ping.timeout", '{"value": 1e999}', "finite"),
     ("ha.tag", '{"value": "a\\u0007b"}', "control"),
     ("ha.tag", '{"\\ud800": "x"}', "value")],
)
def test_put_unstorable_value_is_400_and_changes_nothing(api, key, body, reason):
    """Issue 8: NUL, lone surrogates and values over the column size were a 500; now a
    400 with the reason, nothing stored, no event."""
    before = list(Configuration.objects.values())
    r = api.put(f"{API}/config/{key}", body, content_type="application/json")
    assert r.status_code == 400, r.content
    assert reason in r.json()["error"]
    assert len(r.content) < 2000  # the reason, not the value, is what comes back
    assert list(Configuration.objects.values()) == before
    assert not Event.objects.exists()


def test_put_value_of_the_column_size_is_stored(api):
    tag = "t" * 4096
    r = put(api, "ha.tag", tag)
    assert r.status_code == 200, r.content
    assert config.get("ha.tag") == tag
    ev = Event.objects.get(event="ConfigChanged")
    assert len(ev.new) <= 255  # the event keeps a cut copy


def test_options_on_a_key(api):
    """Issue 8: OPTIONS on a config key was a 500."""
    r = api.options(f"{API}/config/ha.workers")
    assert r.status_code == 200
    assert r.json()["methods"] == ["GET", "PUT", "OPTIONS"]


@pytest.mark.parametrize("raw,reason", [("a\x00b", "NUL"), ("\ud800", "surrogate"),
                                        ("x" * 4097, "at most 4096")])
def test_set_value_refuses_unstorable_text(raw, reason):
    """hadash.config is the one place values are checked (API, admin, scenarios)."""
    with pytest.raises(config.ConfigError, match=reason):
        config.set_value("ha.tag", raw)
    assert config.get("ha.tag") == ""
    assert not Event.objects.exists()
