"""The safe character set for host and VM names (issue 8, R31; docs/deploy.md).

A name travels in URL paths (``/api/v1/hosts/{name}``, ``/vms/{name}/start`` on an
agent, dashboard links), in log lines and in libvirt; a name that cannot travel there
cannot be reached, and a host that cannot be reached can never be fenced. So every
name hadash accepts — from an agent's ``connect`` or power report, from the operator
API, admin or the scenario runner — matches one rule:

    1 to 255 characters: ASCII letters, digits, ``.``, ``_`` and ``-``;
    starting with a letter or digit.

The rule is a pure function shared by the agent protocol and the operator API, so
the two never disagree about what a name is.
"""

from __future__ import annotations

import re

from django.core.validators import RegexValidator

MAX_NAME_LENGTH = 255
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}"
NAME_RULE = (
    "1 to 255 characters: ASCII letters, digits, '.', '_' and '-', "
    "starting with a letter or digit"
)
_NAME = re.compile(NAME_PATTERN)


def name_problem(value: object) -> str | None:
    """Why ``value`` is not a valid host or VM name, or None when it is."""
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if not value:
        return "must not be empty"
    if len(value) > MAX_NAME_LENGTH:
        return f"is too long: {len(value)} characters, at most {MAX_NAME_LENGTH}"
    if not _NAME.fullmatch(value):
        return f"is not a valid name ({NAME_RULE})"
    return None


def is_valid_name(value: object) -> bool:
    return name_problem(value) is None


# For model fields, forms and DRF serializers.
validate_name = RegexValidator(
    regex=rf"\A{NAME_PATTERN}\Z",
    message=f"Not a valid name: {NAME_RULE}.",
    code="invalid_name",
)
