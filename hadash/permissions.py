"""Roles: every logged-in user reads; *admins* act (SPEC: operators browse, admins
change configuration, act on hosts and VMs, inject faults).

Admins are superusers, staff, or members of the group "admins" (created by a
migration, beside the read-only group "operators"). The operator API, the dashboard
and its actions all ask `is_admin`. Django admin itself needs a staff account.
"""

from __future__ import annotations

ADMINS = "admins"
OPERATORS = "operators"


def is_admin(user) -> bool:
    if user is None or not user.is_authenticated or not user.is_active:
        return False
    if user.is_superuser or user.is_staff:
        return True
    cached = getattr(user, "_hadash_is_admin", None)
    if cached is None:
        cached = user.groups.filter(name=ADMINS).exists()
        user._hadash_is_admin = cached
    return cached
