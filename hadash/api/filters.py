"""Query parameters of the list endpoints, validated (a bad value is a 400, not an
empty list) and documented in the OpenAPI schema."""

from __future__ import annotations

import re

from rest_framework import serializers

from hadash.choices import Reason, Severity, Step, Subject, WorkType
from hosts.choices import HostStatus, HostType, ResourceState
from vms.choices import PowerState, Priority, VmState, VmType

DEFAULT_LIMIT = 1000
MAX_LIMIT = 10000
EVENTS_DEFAULT_LIMIT = 500
EVENTS_MAX_LIMIT = 5000
# Row ids and SQL OFFSETs are 64-bit: offset + limit must stay below 2^63 (issue 8: an
# offset of 2^63 was a 500). No table comes near this many rows.
MAX_OFFSET = 2**53 - 1
MAX_ID = 2**63 - 1


class WholeNumberField(serializers.IntegerField):
    """A query parameter that is a whole number written as one: DRF's IntegerField
    also takes "5.0" and "5.00", which the documented schema (type integer) does not
    allow — refused here like any other non-integer."""

    def to_internal_value(self, data):
        if isinstance(data, str) and not re.fullmatch(r"\s*[+-]?\d+\s*", data):
            self.fail("invalid")
        if isinstance(data, float):
            self.fail("invalid")
        return super().to_internal_value(data)


class ListParams(serializers.Serializer):
    limit = WholeNumberField(
        min_value=1, max_value=MAX_LIMIT, default=DEFAULT_LIMIT,
        help_text=f"At most this many rows (default {DEFAULT_LIMIT}, max {MAX_LIMIT}).",
    )
    offset = WholeNumberField(
        min_value=0, max_value=MAX_OFFSET, default=0,
        help_text=f"Skip this many rows (for paging; at most {MAX_OFFSET}).",
    )


class HostParams(ListParams):
    status = serializers.ChoiceField(choices=HostStatus.choices, required=False)
    resource_state = serializers.ChoiceField(choices=ResourceState.choices, required=False)
    cluster = serializers.CharField(required=False)
    type = serializers.ChoiceField(choices=HostType.choices, required=False)

    lookups = {"status": "status", "resource_state": "resource_state",
               "cluster": "cluster", "type": "type"}


class VMParams(ListParams):
    state = serializers.ChoiceField(choices=VmState.choices, required=False)
    power_state = serializers.ChoiceField(choices=PowerState.choices, required=False)
    host = serializers.CharField(required=False, help_text="Host name.")
    ha_enabled = serializers.BooleanField(required=False)
    priority = serializers.ChoiceField(choices=Priority.choices, required=False)
    type = serializers.ChoiceField(choices=VmType.choices, required=False)

    lookups = {"state": "state", "power_state": "power_state", "host": "host__name",
               "ha_enabled": "ha_enabled", "priority": "priority", "type": "type"}


class HaWorkParams(ListParams):
    vm = serializers.CharField(required=False, help_text="VM name.")
    host = serializers.CharField(required=False, help_text="Name of the (failed) host.")
    step = serializers.ChoiceField(choices=Step.choices, required=False)
    type = serializers.ChoiceField(choices=WorkType.choices, required=False)
    reason = serializers.ChoiceField(choices=Reason.choices, required=False)
    finished = serializers.BooleanField(
        required=False, help_text="true: only Done/Cancelled/Error items; false: only open ones."
    )

    lookups = {"vm": "instance__name", "host": "host__name", "step": "step", "type": "type",
               "reason": "reason"}


class UnmanagedParams(ListParams):
    limit = WholeNumberField(
        min_value=1, max_value=MAX_LIMIT, default=MAX_LIMIT,
        help_text=f"At most this many rows (default and max {MAX_LIMIT}).",
    )


NEWEST, OLDEST = "newest", "oldest"


class EventParams(serializers.Serializer):
    after = WholeNumberField(
        min_value=0, max_value=MAX_ID, required=False,
        help_text="Only events with an id greater than this (to follow the feed: the "
        "answer is then oldest first unless `order` says otherwise).",
    )
    limit = WholeNumberField(
        min_value=1, max_value=EVENTS_MAX_LIMIT, default=EVENTS_DEFAULT_LIMIT,
        help_text=f"At most this many events (default {EVENTS_DEFAULT_LIMIT}, "
        f"max {EVENTS_MAX_LIMIT}); the Link header names the next page.",
    )
    offset = WholeNumberField(
        min_value=0, max_value=MAX_OFFSET, default=0,
        help_text=f"Skip this many events (for paging; at most {MAX_OFFSET}).",
    )
    order = serializers.ChoiceField(
        choices=((NEWEST, "newest first"), (OLDEST, "oldest first")), required=False,
        help_text="newest (the default) or oldest first; oldest is the default when "
        "`after` is given, so following the feed reads it in order.",
    )
    latest = serializers.BooleanField(
        default=False,
        help_text="true: the newest `limit` matching events, listed oldest first, e.g. to "
        "fill a feed before following it with after=<last id>.",
    )
    subject = serializers.ChoiceField(choices=Subject.choices, required=False)
    subject_name = serializers.CharField(required=False)
    event = serializers.CharField(required=False)
    alert = serializers.BooleanField(required=False)
    severity = serializers.ChoiceField(choices=Severity.choices, required=False)
    acknowledged = serializers.BooleanField(
        required=False, help_text="With alert=true and false here: the open alerts."
    )

    lookups = {"subject": "subject", "subject_name": "subject_name", "event": "event",
               "alert": "alert", "severity": "severity"}


def apply_lookups(queryset, params: dict, lookups: dict[str, str]):
    for param, lookup in lookups.items():
        if param in params:
            queryset = queryset.filter(**{lookup: params[param]})
    return queryset
